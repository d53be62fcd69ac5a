"""The synthetic suite and the character tokenizer."""

import pytest
from dparallel.data.suite import SPLITS, TASKS, add_solution, is_correct, make_example, make_split
from dparallel.data.tokenizer import build_char_tokenizer


def test_examples_are_deterministic_and_splits_differ():
    assert make_example("add", "test", 7) == make_example("add", "test", 7)
    train = {make_example("copy", "train", i).prompt for i in range(200)}
    test = {make_example("copy", "test", i).prompt for i in range(200)}
    assert len(train & test) < 5  # disjoint up to chance collisions of short strings


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("task", TASKS)
def test_reference_answers_verify_and_corruptions_do_not(task, split):
    for i in range(30):
        ex = make_example(task, split, i)
        assert is_correct(task, ex.prompt, ex.answer)
        assert not is_correct(task, ex.prompt, ex.answer + "x")


def test_add_solution_is_column_wise_with_carries():
    assert add_solution(57, 68) == "7+8+0=15,5+6+1=12 ####125"


def test_word_problem_pinned():
    ex = make_example("word", "test", 0)
    assert ex.prompt == "Eve has 13 coins. Gets 9 more. Gives 9 away. Gets 2 more. How many coins?\n"
    assert ex.answer == "13+9=22. 22-9=13. 13+2=15. ####15"


def test_distinct_accepts_any_distinct_members_only():
    prompt = "list 3 fruits:\n"
    assert is_correct("distinct", prompt, "fig,kiwi,pear")
    assert not is_correct("distinct", prompt, "fig,fig,pear")  # duplicate
    assert not is_correct("distinct", prompt, "fig,kiwi")  # too few
    assert not is_correct("distinct", prompt, "fig,kiwi,cat")  # not a fruit


def test_longer_split_has_longer_inputs():
    short = max(len(make_example("reverse", "test", i).answer) for i in range(100))
    long = min(len(make_example("reverse", "longer", i).answer) for i in range(100))
    assert long > short


def test_make_split_interleaves_tasks():
    exs = make_split(["copy", "sort"], "test", 2)
    assert [e.task for e in exs] == ["copy", "sort", "copy", "sort"]


def test_char_tokenizer_round_trip_and_special_ids():
    tok = build_char_tokenizer()
    assert (tok.pad_token_id, tok.mask_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2, 3)
    text = "add: 12+30\n"
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
