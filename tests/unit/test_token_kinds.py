from cluster.tools.token_kinds import char_kinds, token_kinds


def test_each_character_gets_its_python_token_kind():
    text = "if x1 == 2:  # why\n    return 'a'\n"
    kinds = dict(zip(text, char_kinds(text)))
    assert kinds["i"] == "keyword" and kinds["x"] == "name" and kinds["="] == "punctuation"
    assert kinds["2"] == "number" and kinds["#"] == "comment" and kinds["'"] == "string" and kinds["\n"] == "whitespace"


def test_a_token_takes_its_first_visible_characters_kind():
    text = "def f():\n    pass\n"
    offsets = [(0, 3), (3, 5), (5, 8), (8, 13), (13, 17), (17, 18)]  # "def", " f", "():", "\n    ", "pass", "\n"
    assert token_kinds(text, offsets) == ["keyword", "name", "punctuation", "whitespace", "keyword", "whitespace"]


def test_text_python_cannot_tokenize_is_other_past_the_failure():
    text = "x = '''never closed\n"
    assert char_kinds(text)[0] == "name" and char_kinds(text)[-2] == "other"
