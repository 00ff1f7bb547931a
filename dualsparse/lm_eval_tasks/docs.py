"""Documents of the dualsparse_next_sentence lm-eval task."""


def load(n_items=400, seed=0, **_):
    import datasets

    from dualsparse import builtin
    from dualsparse.sweep import split_paragraphs
    from dualsparse.text import mc_items, paragraphs, read_text

    _, eval_paras = split_paragraphs(paragraphs(read_text(builtin.heldout_path())))
    items = mc_items(eval_paras, int(n_items), seed=int(seed))
    return {"test": datasets.Dataset.from_list(items)}
