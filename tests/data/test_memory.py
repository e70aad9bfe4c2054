"""The store as memory (data.memory): documents indexed into a real SQLite file, and what a
question retrieves from them and from the answers that would train."""

from __future__ import annotations

import os

import pytest

from data import memory
from data.store import open_store
from gpt.errors import KettleError


@pytest.fixture
def store(tmp_path):
    with open_store(tmp_path / "k.db") as s:
        yield s


def correct(store, question, wrong, right):
    conv = store.create_conversation(question)
    user = store.add_message(conv.id, "user", content=question)
    bot = store.add_message(conv.id, "assistant", content=wrong, parent_id=user.id)
    store.set_label(bot.id, ideal=right)
    return bot


def test_markdown_is_chunked_under_its_headings():
    text = "# Brewing\n\nBoil the water.\n\nWarm the pot.\n\n## Green tea\n\n" + "Steep it briefly. " * 80
    chunks = memory.chunk_text(text, suffix=".md")
    assert chunks[0] == ("Brewing", "Boil the water.\n\nWarm the pot.")
    assert {h for h, _ in chunks[1:]} == {"Green tea"} and len(chunks) > 2
    assert all(len(t) <= memory.CHUNK_CHARS for _, t in chunks)
    html = memory.chunk_text("<h1>Tea</h1><p>Black &amp; green.</p><script>x()</script>", suffix=".html")
    assert html == [("Tea", "Black & green.")]


def test_documents_are_indexed_incrementally_deduplicated_and_removable(store, tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "tea.md").write_text("# Tea\n\nThe kettle whistles when the water boils.\n")
    (docs / "sub" / "notes.txt").write_text("Oolong is partly oxidised.\n")
    (docs / "copy.md").write_text("# Tea\n\nThe kettle whistles when the water boils.\n")
    (docs / "image.png").write_bytes(b"\x89PNG")
    (docs / ".hidden").mkdir()
    (docs / ".hidden" / "x.md").write_text("secret")
    files = memory.doc_files(docs)
    assert [f.name for f in files] == ["copy.md", "notes.txt", "tea.md"]
    report = memory.index_documents(store, files)
    assert (report.added, report.duplicates, report.unchanged) == (2, 1, 0)
    again = memory.index_documents(store, files)
    assert (again.added, again.updated, again.unchanged) == (0, 0, 2)  # nothing re-read
    (docs / "sub" / "notes.txt").write_text("Oolong is partly oxidised; sencha is steamed.\n")
    changed = memory.index_documents(store, files)
    assert (changed.updated, changed.unchanged) == (1, 1)
    found = memory.retrieve(store, "Tell me about sencha.")
    assert [p.source for p in found] == [str(docs / "sub" / "notes.txt")]
    assert memory.remove_documents(store, docs / "sub") == 1
    assert memory.retrieve(store, "Tell me about sencha.") == []
    assert store._row("SELECT COUNT(*) AS n FROM doc_passages_fts WHERE doc_passages_fts MATCH 'sencha'")["n"] == 0
    with pytest.raises(KettleError, match="no such file"):
        memory.doc_files(tmp_path / "missing")


def test_a_failure_mid_index_leaves_each_file_whole_or_absent(store, tmp_path, monkeypatch):
    for i in range(3):
        (tmp_path / f"{i}.md").write_text(f"# Part {i}\n\n" + f"Paragraph about topic{i}.\n\n" * 40)
    real = memory.chunk_text
    calls = []

    def failing(text, *, suffix):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user's Ctrl+C, or a kill, between two files
        return real(text, suffix=suffix)

    monkeypatch.setattr(memory, "chunk_text", failing)
    with pytest.raises(KeyboardInterrupt):
        memory.index_documents(store, memory.doc_files(tmp_path))
    sources = memory.doc_sources(store)
    assert [os.path.basename(s.path) for s in sources] == ["0.md"]
    assert sources[0].n_passages == store._row("SELECT COUNT(*) AS n FROM doc_passages")["n"] > 1


def test_a_correction_is_retrieved_reworded_at_once_and_nothing_for_other_questions(store):
    correct(store, "How do I reverse a list in Python?", "Use sort.", "Call my_list.reverse().")
    correct(store, "What does range(5) give?", "1 to 5.", "range(5) gives 0, 1, 2, 3 and 4.")
    store.create_conversation("other")  # a chat with no labels is no memory
    [hit] = memory.retrieve(store, "How can I reverse a Python list?")
    assert (hit.kind, hit.text) == ("correction", "Call my_list.reverse().")
    assert hit.reference == "How do I reverse a list in Python?\nCall my_list.reverse()."
    assert memory.retrieve(store, "What numbers does range(5) produce?")[0].text.startswith("range(5)")
    for other in ("How do I sort a list?", "What does range(10) give?", "What is the capital of France?"):
        assert memory.retrieve(store, other) == [], other
    # a later correction of the same answer replaces what memory holds
    bot = store.list_conversations()[-1]
    answer = store.current_thread(bot.id)[-1]
    store.set_label(answer.id, ideal="Call my_list.reverse(), or use my_list[::-1].")
    assert memory.retrieve(store, "reverse a list")[0].text.endswith("my_list[::-1].")
    store.set_label(answer.id, excluded=True)
    assert memory.retrieve(store, "reverse a list") == []


def test_a_question_about_a_named_member_is_not_answered_by_a_correction_about_its_owner(store):
    """ "What does tuple.count do?" holds all of "What is a tuple?" and more: the correction about
    tuples answered it (a leak of the user's wording into an unrelated answer)."""
    correct(store, "What is a tuple?", "A list.", "A tuple is an immutable sequence.")
    correct(store, "What does str.split do?", "Joins.", "str.split cuts a string at a separator.")
    for question in ("What does tuple.count do?", "What is tuple.index for?", "What does str.join do?"):
        assert [p for p in memory.retrieve(store, question) if p.taught] == [], question
    correct(store, "How do I remove duplicates from a list?", "Sort it.", "Use list(dict.fromkeys(xs)).")
    correct(store, "How do I get the last item of a list?", "xs[0].", "Index it with -1: xs[-1].")
    assert memory.retrieve(store, "How can I drop duplicate items from a list?")[0].text.startswith("Use list(dict")
    assert memory.retrieve(store, "How can I get a list's last element?")[0].text.startswith("Index it with -1")
    correct(store, "How do I reverse a list?", "Sort it.", "Call xs.reverse().")
    assert memory.retrieve(store, "What's the way to flip a list around?")[0].text == "Call xs.reverse()."
    # seen in try-the-loop: "dedupe" for removing duplicates, "turn" for convert
    assert memory.retrieve(store, "dedupe a list in python")[0].text.startswith("Use list(dict")
    correct(store, "How do I convert a string to an integer?", "str().", "Call int(text).")
    assert memory.retrieve(store, "How can I turn a string into an int?")[0].text == "Call int(text)."
    [hit] = memory.retrieve(store, "What's a tuple in Python?")
    assert hit.taught and memory.taught_count([hit]) == 1
    assert memory.retrieve(store, "what is str.split() for")[0].text.startswith("str.split cuts")


def test_a_correction_is_found_asked_in_other_words_and_not_for_other_questions(store):
    """Phrases and near synonyms people put for a correction's words ("backwards", "get rid of",
    "one line at a time", "largest to smallest"); and questions sharing its words that ask
    something else ("What is a list?", the conversion the other way round) find no correction."""
    lessons = {
        "How do I reverse a list?": "Call xs.reverse().",
        "How do I remove duplicates from a list?": "Use list(dict.fromkeys(xs)).",
        "How do I read a file line by line?": "Loop over open(path).",
        "How do I sort a list in descending order?": "Call xs.sort(reverse=True).",
        "How do I get the length of a list?": "Call len(xs).",
        "How do I copy a list?": "Call xs.copy().",
        "How do I split a string on commas?": 'Call text.split(",").',
        "How do I convert a string to an integer?": "Call int(text).",
        "How do I check if a key is in a dictionary?": "Use key in d.",
        "What does isinstance check?": "Whether obj is an instance of cls.",
        "How do I split a string into words?": "Call text.split().",
    }
    for question, answer in lessons.items():
        correct(store, question, "I am not sure.", answer)
    for reworded, question in [
        ("How can I get a list backwards?", "How do I reverse a list?"),
        ("How do I get rid of repeated items in a list?", "How do I remove duplicates from a list?"),
        ("How do I read a file one line at a time?", "How do I read a file line by line?"),
        ("How do I sort a list from largest to smallest?", "How do I sort a list in descending order?"),
        ("sort a list backwards", "How do I sort a list in descending order?"),
        ("How can I tell how long a list is?", "How do I get the length of a list?"),
        ("How do I duplicate a list?", "How do I copy a list?"),
        ("How do I separate text at each comma?", "How do I split a string on commas?"),
        ("How can I see if a dict contains a certain key?", "How do I check if a key is in a dictionary?"),
        ("change a string into an int", "How do I convert a string to an integer?"),
        ("what is isinstance for?", "What does isinstance check?"),  # one word, the one it is about
        ("break a sentence into a list of words", "How do I split a string into words?"),
    ]:
        found = [p for p in memory.retrieve(store, reworded) if p.taught]
        assert found and found[0].text == lessons[question], reworded
    for other in ("What is a list?", "How do I convert an integer to a string?", "What is a string?"):
        assert [p for p in memory.retrieve(store, other) if p.taught] == [], other


def test_python_documentation_by_name_and_a_threshold_for_the_rest(store):
    report = memory.index_python_docs(store)
    assert report.added > 100 and report.passages > 1000
    assert memory.index_python_docs(store).unchanged == report.added  # unchanged modules skipped
    [hit] = memory.retrieve(store, "What does textwrap.dedent do?")
    assert (hit.kind, hit.source, hit.name) == ("python", "python:textwrap", "textwrap.dedent")
    assert "common leading whitespace" in hit.text
    assert memory.retrieve(store, "What does getattr do?")[0].name == "getattr"
    # a name that is also another word's short form ("len" for length) is looked up as written
    assert memory.retrieve(store, "What does len do?")[0].name == "len"
    for question in ("Who painted the Mona Lisa?", "What is a good recipe for pancakes?", "How tall is Everest?"):
        assert memory.retrieve(store, question) == [], question
    # small talk is about nothing in the store: "Hi!" found bisect's `hi` parameter, "thanks" a
    # docstring thanking its author
    for question in ("Hi!", "hello", "thanks", "thank you!", "ok", "bye", "What's up?", "Hello, how are you?"):
        assert memory.retrieve(store, question) == [], question
        # nor is it a follow-up of the chat's last question (which "and how is it used?" is)
        assert memory.retrieve(store, question, recent=["What does textwrap.dedent do?"]) == [], question
    assert memory.retrieve(store, "and how is it used?", recent=["What does textwrap.dedent do?"])
    # a builtin by its own name, not a method of that name ("What is a list?" got imaplib.IMAP4.list)
    assert [p.name for p in memory.retrieve(store, "What is a list?")][:1] == ["list"]
    # nor a method of another builtin type than the one asked about ("Reverse *IN PLACE*.")
    assert "list.reverse" in [p.name for p in memory.retrieve(store, "How do I reverse a list?")]
    found = [p.name for p in memory.retrieve(store, "How do I reverse a string?")]
    assert not {"list.reverse", "bytearray.reverse"} & set(found), found
    # small talk the model learned is its memory: the nearest form it was taught, padding aside;
    # none taught, nothing (above), and never the documentation ("thanks a lot": shelve's "lot")
    memory.index_lessons(
        store,
        "starter",
        [("Hi!", "Hello! Ask me about Python."), ("Thanks!", "You're welcome."), ("How are you?", "I'm fine.")]
        + [("Good morning!", "Hello! Ask me about Python."), ("What does getattr do?", "Get an attribute.")]
        + [("Hello, can you help me?", "Hello! Ask me about Python."), ("What does help do?", "Start help.")],
    )
    for said, taught in [
        ("hey there", "Hi!"),
        ("Good evening", "Good morning!"),
        ("Thanks a lot!", "Thanks!"),
        ("thank you so much", "Thanks!"),
        ("How are you doing today?", "How are you?"),
        ("Hi, could you help me?", "Hello, can you help me?"),  # not the documentation of help()
        ("What does help do?", "What does help do?"),  # and help() not small talk
    ]:
        assert [(p.kind, p.name) for p in memory.retrieve(store, said)] == [("lesson", taught)], said
    for said in ("bye for now", "ok", "cheers, one more thing"):
        assert memory.retrieve(store, said) == [], said
    # the mark that the documentation is whole is no passage, and the counts say what is there
    assert memory.retrieve(store, "Is every module indexed in the documentation?") == []
    marker = f"{memory.PYTHON_LAST}\n\nThe end of Python's documentation: every module before it is indexed."
    memory.put_source(store, "python", f"python:{memory.PYTHON_LAST}", [memory.python_chunk(marker)], sha256="old")
    assert memory.retrieve(store, "Is every module indexed in the documentation?") == []  # as an older Kettle wrote it
    sources = memory.doc_sources(store, kind="python")
    assert (len(sources), sum(s.n_passages for s in sources)) == (report.added, report.passages)


def test_an_answer_keeps_the_passages_it_was_grounded_in(store):
    correct(store, "How do I reverse a list?", "No idea.", "Call my_list.reverse().")
    found = memory.retrieve(store, "How can I reverse a list?")
    conv = store.create_conversation("later")
    user = store.add_message(conv.id, "user", content="How can I reverse a list?")
    bot = store.add_message(conv.id, "assistant", content="Call my_list.reverse().", parent_id=user.id)
    memory.record_sources(store, bot.id, found)
    [kept] = memory.answer_sources(store, bot.id)
    assert (kept.kind, kept.text, kept.ref) == ("correction", "Call my_list.reverse().", found[0].ref)
    assert memory.answer_sources(store, user.id) == []


def test_retrieval_reads_nothing_of_the_store_the_question_does_not_match(tmp_path):
    """What a retrieval costs grows with what holds the question's words, not with the rest of
    the store (a user's whole documentation and chat history): counted in SQLite's virtual
    machine steps, which a busy machine does not blur as it does time."""

    def steps(others: int) -> int:
        with open_store(tmp_path / f"{others}.db") as store:
            memory.put_source(store, "file", "/kettle.md", [("K", "The kettle whistles as water boils.")], sha256="a")
            tea = [(f"Tea {i}", f"Steep green tea for {i} minutes.") for i in range(others)]
            memory.put_source(store, "file", "/tea.md", tea, sha256="b")
            with store.transaction():
                chat = store.create_conversation("tea")
                for i in range(others):
                    store.add_message(chat.id, "user", content=f"Is oolong number {i} good?")
            correct(store, "Why does my kettle whistle?", "No idea.", "Steam escapes through its spout.")
            counted = []
            store.conn.set_progress_handler(lambda: counted.append(1), 1)  # None: go on
            found = memory.retrieve(store, "Why does the kettle whistle?")
            store.conn.set_progress_handler(None, 1)
            assert [(p.kind, p.name) for p in found] == [("correction", "Why does my kettle whistle?"), ("file", "K")]
            return len(counted)

    # counting the rows of the passages' and the messages' FTS indexes read each one's text:
    # 2,457 steps beside 20 of each, 35,981 beside 2,000
    assert steps(2000) < 1.1 * steps(20)


def test_a_models_lessons_answer_its_questions_asked_again_in_other_words(store):
    """Beside its documentation the starter answered its own "How do I ...?" lessons in the
    documentation's words ("Return a copy ..." for "Call str.replace(): return a copy ...")."""
    lessons = [
        ("How do I get a copy with all occurrences of substring old replaced by new?", "Call str.replace(): return."),
        ("How do I get True if the string is a numeric string, False otherwise?", "Call str.isnumeric()."),
        ("How do I get True if the string is an alpha-numeric string, False otherwise?", "Call str.isalnum()."),
        ("How do I remove all items from list?", "Call list.clear(): remove all items from list."),
    ]
    assert memory.index_lessons(store, "starter", lessons) == 4
    assert memory.index_lessons(store, "starter-ft", [lessons[0], ("  ", "blank")]) == 0  # kept once
    [hit] = memory.retrieve(store, "how can i remove all the items from a list")
    assert (hit.kind, hit.taught, hit.source) == ("lesson", False, "starter")
    assert hit.reference == f"{lessons[3][0]}\n{lessons[3][1]}"
    # the closest lesson first: two alike part only on "alpha"
    found = memory.retrieve(store, "How do I get True if a string is numeric, False otherwise?")
    assert [p.text for p in found[:2]] == ["Call str.isnumeric().", "Call str.isalnum()."]
    for other in ("How do I sort a list?", "What is the capital of France?", "How do I remove a file?"):
        assert [p for p in memory.retrieve(store, other) if p.kind == "lesson"] == [], other
    # a lesson learnt later is memory at once, and the user's correction comes before any lesson
    memory.index_lessons(store, "starter", [("How do I sort a list?", "Call list.sort().")])
    assert memory.retrieve(store, "how can I sort a list")[0].text == "Call list.sort()."
    correct(store, "How do I sort a list?", "Call list.sort().", "Call sorted(xs) for a new list.")
    found = memory.retrieve(store, "How can I sort a list?")
    assert [(p.kind, p.taught) for p in found] == [("correction", True), ("lesson", False)]
    assert memory.taught_count(found) == 1
