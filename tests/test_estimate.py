import pandas as pd

from irank.core.estimate import estimate_noise_share


def test_disagreement_share_counts_label_prediction_mismatches():
    table = pd.DataFrame({"label": ["a", "b", "a", "c"], "predicted": ["a", "a", "a", "b"], "score": [1.0, 2, 3, 4]})
    estimate = estimate_noise_share(table)
    assert estimate["share"] == 0.5 and estimate["method"] == "disagreement"
