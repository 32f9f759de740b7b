import pandas as pd

from irank.core.estimate import estimate_noise_share


def test_disagreement_share_counts_label_prediction_mismatches():
    table = pd.DataFrame({"label": ["a", "b", "a", "c"], "predicted": ["a", "a", "a", "b"], "score": [1.0, 2, 3, 4]})
    estimate = estimate_noise_share(table)
    assert estimate["share"] == 0.5 and estimate["method"] == "disagreement"


def test_issue_summary_counts_disagreements_per_class_and_pair():
    from irank.core.estimate import issue_summary

    labels = ["cat", "cat", "cat", "dog", "dog", "bird"]
    predicted = ["cat", "dog", "dog", "cat", "dog", "dog"]
    summary = issue_summary(labels, predicted, classes=["bird", "cat", "dog"])
    assert (summary["rows"], summary["estimated_issues"]) == (6, 4) and summary["share"] == 4 / 6
    assert summary["per_class"] == {"bird": {"rows": 1, "estimated_issues": 1}, "cat": {"rows": 3, "estimated_issues": 2},
                                    "dog": {"rows": 2, "estimated_issues": 1}}
    assert summary["confused_pairs"] == [{"given": "cat", "suggested": "dog", "count": 2},
                                         {"given": "bird", "suggested": "dog", "count": 1},
                                         {"given": "dog", "suggested": "cat", "count": 1}]
