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


def test_issue_summaries_of_blocks_merge_into_the_whole_tables():
    import numpy as np

    from irank.core.estimate import issue_summary, merge_issue_summaries

    generator = np.random.default_rng(0)
    classes = ["a", "b", "c", "d"]
    labels = generator.choice(classes[:3], 500).tolist()
    predicted = generator.choice(classes, 500).tolist()
    whole = issue_summary(labels, predicted, classes)
    blocks = [issue_summary(labels[start:start + 64], predicted[start:start + 64]) for start in range(0, 500, 64)]
    assert merge_issue_summaries(blocks, classes) == whole
    assert merge_issue_summaries(blocks) == issue_summary(labels, predicted)
    assert merge_issue_summaries([], classes)["per_class"]["d"] == {"rows": 0, "estimated_issues": 0}
    outside = merge_issue_summaries([issue_summary(["z", "a"], ["a", "a"])], ["a"])
    assert list(outside["per_class"]) == ["a", "z"] and outside["estimated_issues"] == 1
