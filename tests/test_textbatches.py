"""ds.text_batches: text (strings, files, lists) and a tokenizer to token
batches.  The reference is the tokenizer itself, called on each whole
document, and the windows cut from that stream by hand."""
import gzip
import pathlib

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import dualsparse as ds  # noqa: E402
from dualsparse import builtin  # noqa: E402
from dualsparse.text import read_text  # noqa: E402

TOKENIZER_DIR = pathlib.Path(builtin.__file__).resolve().parent / "tokenizer"

PARA = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife.\n\nHowever little known the feelings or views of such a man may be on his "
        "first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families.\n")


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR, local_files_only=True)


def ref_ids(tok, docs, eos):
    out = []
    for i, d in enumerate(docs):
        if i and eos is not None:
            out.append(eos)
        out.extend(tok(d, add_special_tokens=False)["input_ids"])
    return out


def ref_windows(ids, seq_len, n=None):
    n = len(ids) // seq_len if n is None else n
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).reshape(n, seq_len)


def check(batches, expected, batch_size):
    assert all(isinstance(b, torch.Tensor) and b.dtype == torch.int64 and b.dim() == 2 for b in batches)
    assert all(b.shape[0] <= batch_size for b in batches)
    assert all(b.shape[0] == batch_size for b in batches[:-1])
    assert torch.equal(torch.cat(batches), expected)


def test_one_string(tok):
    text = PARA * 6
    ids = ref_ids(tok, [text], tok.eos_token_id)
    assert len(ids) > 100
    b = ds.text_batches(text, tok, seq_len=16, batch_size=3)
    check(b, ref_windows(ids, 16), 3)
    assert len(b) == -(-(len(ids) // 16) // 3)


def test_documents_joined_with_eos(tok):
    docs = [PARA, "A second, shorter document.", PARA.upper()]
    eos = tok.eos_token_id
    assert eos is not None
    ids = ref_ids(tok, docs, eos)
    b = ds.text_batches(docs, tok, seq_len=8, batch_size=4)
    check(b, ref_windows(ids, 8), 4)
    # the EOS ids sit exactly between the documents
    n0 = len(tok(docs[0], add_special_tokens=False)["input_ids"])
    assert ids[n0] == eos and torch.cat(b).reshape(-1)[n0].item() == eos


class NoEos:
    """A tokenizer without an EOS token: documents are simply concatenated."""

    eos_token_id = None

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, *a, **k):
        return self.tok(*a, **k)


def test_no_eos_token(tok):
    docs = [PARA, PARA]
    ids = ref_ids(tok, docs, None)
    check(ds.text_batches(docs, NoEos(tok), seq_len=8, batch_size=100), ref_windows(ids, 8), 100)


def test_files_str_path_gz_and_mixed(tok, tmp_path, monkeypatch):
    a = tmp_path / "a.txt"
    a.write_text(PARA * 3, encoding="utf-8")
    g = tmp_path / "b.txt.gz"
    with gzip.open(g, "wt", encoding="utf-8") as f:
        f.write(PARA.replace("truth", "fact") * 2)
    inline = "Some inline text between the files, long enough to tokenize."
    docs = [read_text(a), read_text(g), inline]
    ids = ref_ids(tok, docs, tok.eos_token_id)
    expected = ref_windows(ids, 12)
    check(ds.text_batches([a, str(g), inline], tok, seq_len=12, batch_size=5), expected, 5)
    # one path alone, as str or Path
    one = ref_windows(ref_ids(tok, [read_text(a)], None), 12)
    check(ds.text_batches(str(a), tok, seq_len=12), one, 8)
    check(ds.text_batches(a, tok, seq_len=12), one, 8)
    # a relative file name in the working directory is a file
    monkeypatch.chdir(tmp_path)
    check(ds.text_batches("a.txt", tok, seq_len=12), one, 8)


def test_the_packaged_heldout_text_with_max_tokens(tok):
    """A long file with max_tokens: only a prefix is tokenized, and the
    windows equal those of the whole file's tokens."""
    path = builtin.heldout_path()
    full = tok(read_text(path), add_special_tokens=False, verbose=False)["input_ids"]
    assert len(full) > 50_000
    for seq_len, max_tokens in ((64, 1000), (256, 4096), (100, 20_000)):
        n = max_tokens // seq_len
        b = ds.text_batches(path, tok, seq_len=seq_len, batch_size=4, max_tokens=max_tokens)
        check(b, ref_windows(full, seq_len, n), 4)
        assert sum(x.shape[0] for x in b) == n
    # max_tokens larger than the text: every full window
    b = ds.text_batches(PARA * 4, tok, seq_len=10, max_tokens=10**9)
    check(b, ref_windows(ref_ids(tok, [PARA * 4], None), 10), 8)


def test_max_tokens_stops_before_later_documents(tok):
    docs = [PARA * 4, PARA.upper() * 4]
    ids = ref_ids(tok, docs, tok.eos_token_id)
    n0 = len(tok(docs[0], add_special_tokens=False)["input_ids"])
    b = ds.text_batches(docs, tok, seq_len=10, max_tokens=n0 + 25)
    check(b, ref_windows(ids, 10, (n0 + 25) // 10), 8)


def test_drop_last_and_batch_shapes(tok):
    text = PARA * 6
    n = len(ref_ids(tok, [text], None)) // 8
    assert n % 5
    b = ds.text_batches(text, tok, seq_len=8, batch_size=5)
    assert [x.shape[0] for x in b] == [5] * (n // 5) + [n % 5]
    b2 = ds.text_batches(text, tok, seq_len=8, batch_size=5, drop_last=True)
    assert [x.shape[0] for x in b2] == [5] * (n // 5)
    assert all(torch.equal(x, y) for x, y in zip(b, b2))
    with pytest.raises(ValueError, match="less than one full batch"):
        ds.text_batches(text, tok, seq_len=8, batch_size=n + 1, drop_last=True)


def test_device_argument(tok):
    b = ds.text_batches(PARA, tok, seq_len=8, device="meta")
    assert b[0].device.type == "meta"


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(seq_len=0), ValueError, "seq_len must be a positive int; got 0"),
    (dict(seq_len=-3), ValueError, "seq_len must be a positive int; got -3"),
    (dict(seq_len=2.5), TypeError, "seq_len must be a positive int"),
    (dict(seq_len=True), TypeError, "seq_len must be a positive int"),
    (dict(seq_len="64"), TypeError, "seq_len must be a positive int"),
    (dict(batch_size=0), ValueError, "batch_size must be a positive int; got 0"),
    (dict(batch_size=None), TypeError, "batch_size must be a positive int"),
    (dict(max_tokens=0), ValueError, "max_tokens must be a positive int; got 0"),
    (dict(max_tokens=1.0), TypeError, "max_tokens must be a positive int or None"),
    (dict(seq_len=64, max_tokens=63), ValueError, "max_tokens=63 is less than one window of seq_len=64"),
])
def test_bad_arguments(tok, kw, exc, msg):
    with pytest.raises(exc, match=msg.replace("(", r"\(").replace(")", r"\)")):
        ds.text_batches(PARA, tok, **kw)


def test_bad_texts(tok, tmp_path):
    with pytest.raises(ValueError, match="texts is empty"):
        ds.text_batches("", tok)
    with pytest.raises(ValueError, match=r"texts\[1\] is empty"):
        ds.text_batches([PARA, "  \n\n "], tok, seq_len=4)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=r"texts \(file .*empty.txt'\) is empty"):
        ds.text_batches(empty, tok)
    with pytest.raises(ValueError, match="texts is an empty list"):
        ds.text_batches([], tok)
    missing = str(tmp_path / "nope.txt.gz")
    with pytest.raises(FileNotFoundError, match="looks like a text file name but no such file") as e:
        ds.text_batches(missing, tok)
    assert missing in str(e.value)
    with pytest.raises(FileNotFoundError, match=r"texts\[1\] is a path, but no such file"):
        ds.text_batches([PARA, tmp_path / "nope.md"], tok)
    # a one-line text that does not look like a file name is text
    assert ds.text_batches("just some words that end in txt", tok, seq_len=2)
    with pytest.raises(TypeError, match="got bytes"):
        ds.text_batches(b"bytes", tok)
    with pytest.raises(TypeError, match=r"texts\[1\] must be str"):
        ds.text_batches([PARA, 3], tok)
    with pytest.raises(TypeError, match="texts must be str"):
        ds.text_batches(3, tok)
    with pytest.raises(ValueError, match=r"the text has \d+ tokens, less than one window of seq_len=4096"):
        ds.text_batches(PARA, tok, seq_len=4096)


def test_bad_tokenizer():
    with pytest.raises(TypeError, match="tokenizer must be a Hugging Face tokenizer"):
        ds.text_batches(PARA, None)
    with pytest.raises(TypeError, match="tokenizer must be a Hugging Face tokenizer returning 'input_ids'"):
        ds.text_batches(PARA, lambda text, **k: {"ids": [1, 2]})


def test_batches_feed_profile_and_routing_scores():
    """The batches are what the calibration functions take."""
    model, tok = builtin.load("olmoe")
    batches = ds.text_batches(builtin.heldout_path(), tok, seq_len=32, batch_size=2, max_tokens=96)
    assert [tuple(b.shape) for b in batches] == [(2, 32), (1, 32)]
    ds.patch(model)
    scores = ds.routing_scores(model, batches, show_progress=False)
    assert len(scores) == model.config.num_hidden_layers
    assert all(s.shape == (96, model.config.num_experts_per_tok) for s in scores)
    ds.profile(model, batches, show_progress=False)
    with torch.no_grad():
        model(batches[0])
    assert ds.drop_stats(model).overall == 0.0
