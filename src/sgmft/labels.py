"""The eight semantic places of the paper (section 3.4), in a fixed index order."""


from sgmft.errors import InputError  # noqa: E402,I001  (user errors: SgmftError and ValueError)
DEFAULT_LABELS: tuple[str, ...] = (
    "home", "work", "school", "restaurant", "cinema", "gym", "shopping", "travel",
)


def label_mapping(store_names, model_names, store_where, model_where):
    """Index map from a store's label order to a model's, matched by name.

    ``mapping[i]`` is the model's index of the store's label ``i``. Names the model does not
    know are an error naming both files (scoring them as if the orders matched would be
    silently wrong).
    """
    import numpy as np

    index = {n: j for j, n in enumerate(model_names)}
    unknown = [n for n in store_names if n not in index]
    if unknown:
        raise InputError(f"{store_where}: label name(s) {unknown[:8]} are not among the model's labels "
                         f"{list(model_names)} ({model_where}); evaluate with a store of the same places")
    return np.array([index[n] for n in store_names], dtype=np.int64)
