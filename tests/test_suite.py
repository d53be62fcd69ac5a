"""The synthetic suite v2 (tasks, families, verifiers, splits) and the character tokenizer."""

import statistics

import pytest

from dparallel.adapters.char_tokenizer import build_char_tokenizer
from dparallel.core.errors import DParallelError
from dparallel.data.suite import (
    FAMILIES,
    GEN_LENGTH,
    SPLITS,
    TASK_FAMILY,
    TASKS,
    is_correct,
    make_example,
    make_split,
    random_latin_square,
    validate_tasks,
)


def test_examples_are_deterministic_and_splits_differ():
    assert make_example("sum", "test", 7) == make_example("sum", "test", 7)
    train = {make_example("copy", "train", i).prompt for i in range(200)}
    test = {make_example("copy", "test", i).prompt for i in range(200)}
    assert not train & test


def test_three_families_cover_every_task_once():
    assert set(FAMILIES) == {"one-answer", "many-answers", "reasoning"}
    assert sorted(TASKS) == sorted(t for tasks in FAMILIES.values() for t in tasks)
    assert make_example("shuffle", "test", 0).family == "many-answers"
    assert TASK_FAMILY["chain"] == "reasoning"


def test_pinned_examples():
    assert make_example("insert_index", "test", 0).prompt == "insert u at 9: fwtbkrexspzagdcjm\n"
    assert make_example("insert_index", "test", 0).answer == "fwtbkrexuspzagdcjm"
    assert make_example("latin_square", "test", 0).answer == "myrl, yrlm, lmyr, rlmy"
    assert make_example("sum", "test", 0).answer == "2+1=3,9+3=12####12"
    assert make_example("chain", "test", 0).answer == "10-6=4,6+4=10,10-8=2####2"


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("task", TASKS)
def test_reference_answers_verify_and_corruptions_do_not(task, split):
    for i in range(30):
        ex = make_example(task, split, i)
        assert is_correct(task, ex.prompt, ex.answer)
        assert not is_correct(task, ex.prompt, ex.answer + "x")
        assert not is_correct(task, ex.prompt, ex.answer[:-1])


@pytest.mark.parametrize("task", TASKS)
def test_answers_fill_the_canvas_and_fit_it(task):
    """BENCHMARK.md: mean answer tokens >= 60% of the default canvas on every task; the longest answer (any
    split) leaves room for its EOS."""
    test = [len(make_example(task, "test", i).answer) for i in range(300)]
    assert statistics.mean(test) >= 0.6 * GEN_LENGTH
    assert max(len(make_example(task, s, i).answer) for s in SPLITS for i in range(300)) < GEN_LENGTH


def test_many_answers_verifiers_accept_other_valid_answers():
    assert is_correct("shuffle", "shuffle: abcd\n", "dcba")
    assert not is_correct("shuffle", "shuffle: abcd\n", "abcd")  # must differ from the input
    assert not is_correct("shuffle", "shuffle: abcd\n", "abcc")
    assert is_correct("insert_random", "insert x: abc\n", "xabc")
    assert is_correct("insert_random", "insert x: abc\n", "abcx")
    assert not is_correct("insert_random", "insert x: abc\n", "axbxc")
    assert not is_correct("insert_index", "insert x at 2: abc\n", "xabc")
    assert is_correct("insert_index", "insert x at 2: abc\n", "axbc")
    assert is_correct("distinct", "3 distinct uppercase:\n", "QAZ")
    assert not is_correct("distinct", "3 distinct uppercase:\n", "QAA")  # duplicate
    assert not is_correct("distinct", "3 distinct uppercase:\n", "QAz")  # not in the category
    assert not is_correct("distinct", "3 distinct uppercase:\n", "QA")  # too few
    assert is_correct("latin_square", "latin square: abcd\n", "abcd, badc, cdab, dcba")
    assert not is_correct("latin_square", "latin square: abcd\n", "abcd, badc, cdab, dcab")  # column repeats
    assert not is_correct("latin_square", "latin square: abcd\n", "abce, badc, cdab, dcba")


def test_reasoning_verifiers_accept_every_order_and_check_each_step():
    prompt = "sum: 3 7 5\n"
    for out in ("3+7=10,10+5=15####15", "5+3=8,7+8=15####15", "7+5=12,12+3=15####15"):
        assert is_correct("sum", prompt, out)
    assert not is_correct("sum", prompt, "3+7=10,10+5=16####15")  # a wrong step
    assert not is_correct("sum", prompt, "3+7=10,10+7=17####17")  # a digit used twice
    assert not is_correct("sum", prompt, "3+7=10####15")  # a digit left out
    assert not is_correct("sum", prompt, "3+7=10,10+5=15####16")  # wrong final
    chain = "chain: 7 +5 *2 -3\n"
    for out in ("7+5=12,12*2=24,24-3=21####21", "5+7=12,2*12=24,24-3=21####21"):
        assert is_correct("chain", chain, out)
    assert not is_correct("chain", chain, "5+7=12,2*12=24,3-24=21####21")  # '-' is not commutative
    assert not is_correct("chain", chain, "7+5=12,12*2=24####24")  # a step missing
    assert not is_correct("chain", chain, "7+5=12,12*2=24,24-3=21####22")


def test_latin_squares_are_uniform_over_all_576():
    import random

    rng = random.Random(0)
    seen = {tuple(random_latin_square(rng, "abcd")) for _ in range(3000)}
    assert 500 < len(seen) <= 576
    assert all(is_correct("latin_square", "latin square: abcd\n", ", ".join(sq)) for sq in seen)


def test_longer_split_has_longer_letter_lists():
    short = max(len(make_example("reverse", "train", i).answer) for i in range(300))
    long = min(len(make_example("reverse", "longer", i).answer) for i in range(100))
    assert long > short


def test_make_split_interleaves_tasks():
    exs = make_split(["copy", "sort"], "test", 2)
    assert [e.task for e in exs] == ["copy", "sort", "copy", "sort"]


@pytest.mark.parametrize(
    ("tasks", "message"),
    [([], "the task list is empty"), (["copy", "add"], "unknown task 'add': choose from copy, reverse")],
)
def test_bad_task_lists_are_one_line_errors(tasks, message):
    with pytest.raises(DParallelError, match=message):
        validate_tasks(tasks)
    with pytest.raises(DParallelError, match=message):
        make_split(tasks, "test", 1)


def test_char_tokenizer_round_trip_and_special_ids():
    tok = build_char_tokenizer()
    assert (tok.pad_token_id, tok.mask_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2, 3)
    text = "sum: 3 7 5\n"
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
