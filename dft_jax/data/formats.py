"""Rows -> token ids and per-token trained flags, through the chat template.

Formats (`data.format`):
  prompt_response  fields `data.prompt_field` / `data.response_field` (dotted keys reach nested
                   fields: `extra_info.question`); rendered as [system?, user, assistant].
  messages         `data.messages_field` holds [{role, content}, ...]; roles system/user/assistant.
  text             `data.text_field`; every token is trained, EOS appended.

Trained span of an assistant turn (what `trained[i] = 1` marks; token i is a training target):
the tokens from the end of the generation prompt (`add_generation_prompt=True` rendering of the
turns before it) through the last special token the template puts in that turn, its end-of-turn
token. For ChatML (`<|im_start|>assistant\\n{content}<|im_end|>\\n`) that is `{content}<|im_end|>`:
the model learns the answer and to stop; the newline after `<|im_end|>` is not trained.
The span is found by rendering prefixes of the conversation and checking that their tokens are
prefixes of the full conversation's tokens, so it works for any template; a template that renders
earlier turns differently once later turns exist is reported as a DataError.

With `data.chat_template="none"` (prompt_response only) the sequence is
tokens(prompt) + tokens(response) + [EOS], the tokenizer's own leading special tokens (BOS) kept.
`data.loss_on`: "assistant" (every assistant turn), "last_assistant" (the same as "assistant" for
prompt_response), "all" (every token of the example, prompt and template tokens included).

A row whose trained reply is empty or whitespace (a response, a text, or any trained assistant
turn of a conversation; every assistant turn with loss_on="all") is empty: it would teach only to
stop at once, so it encodes to no tokens and the iterator drops it and counts it as "empty".
"""
import os

import jinja2

from dft_jax.errors import ConfigError, DataError

FORMATS = ("prompt_response", "messages", "text")
LOSS_ON = ("assistant", "last_assistant", "all")
ROLES = ("system", "user", "assistant")
COLUMNS = ("input_ids", "trained", "num_tokens", "num_trained", "first_trained")
VERSION = 2  # of the encoding (2: blank trained assistant turns drop the row); keys the cache


def get_field(row, key):
  """row[key], or row[a][b] for key "a.b" when there is no literal "a.b" column; None if absent."""
  if key in row:
    return row[key]
  value = row
  for part in key.split("."):
    if not isinstance(value, dict) or part not in value:
      return None
    value = value[part]
  return value


def has_column(column_names, key):
  return key in column_names or key.split(".")[0] in column_names


def fields_of(data_cfg):
  """The row fields a format reads."""
  return {"prompt_response": (data_cfg.prompt_field, data_cfg.response_field),
          "messages": (data_cfg.messages_field,),
          "text": (data_cfg.text_field,)}[data_cfg.format]


def resolve_chat_template(data_cfg, tokenizer):
  """The Jinja template to use; None for plain concatenation (`data.chat_template='none'`)."""
  template = data_cfg.chat_template
  if template == "none":
    if data_cfg.format == "messages":
      raise ConfigError("data.chat_template='none' cannot render data.format='messages'; "
                        "give a Jinja template or leave it unset to use the tokenizer's")
    if data_cfg.system_prompt:
      raise ConfigError("data.system_prompt needs a chat template; data.chat_template is 'none'")
    return None
  if template:
    if os.path.isfile(template):
      with open(template, encoding="utf-8") as f:
        return f.read()
    return template
  template = getattr(tokenizer, "chat_template", None)
  if isinstance(template, dict):
    template = template.get("default")
  if not template:
    raise ConfigError("the tokenizer has no chat template; set data.chat_template to a Jinja "
                      "template (string or file) or to 'none' (prompt + response + EOS, no roles)")
  return template


class Encoder:
  """The `datasets.map` function (batched, with_indices): rows -> COLUMNS.

  input_ids      token ids of the whole example
  trained        1 where the token is a training target (never the first token)
  num_tokens     len(input_ids); 0 marks an empty row (a blank trained reply or text, or no
                 messages)
  num_trained    sum(trained)
  first_trained  index of the first trained token, -1 if none
  """

  def __init__(self, data_cfg, tokenizer, locate=None):
    if data_cfg.format not in FORMATS:
      raise ConfigError(f"data.format={data_cfg.format!r}: expected one of {', '.join(FORMATS)}")
    if data_cfg.loss_on not in LOSS_ON:
      raise ConfigError(f"data.loss_on={data_cfg.loss_on!r}: expected one of {', '.join(LOSS_ON)}")
    if tokenizer.eos_token_id is None:
      raise ConfigError("the tokenizer has no eos_token; trained responses must end with one")
    self.cfg = data_cfg
    self.tokenizer = tokenizer
    self.locate = locate or (lambda i: f"row {i}")
    self.template = (None if data_cfg.format == "text"
                     else resolve_chat_template(data_cfg, tokenizer))
    self.eos_id = tokenizer.eos_token_id
    self.special_ids = frozenset(tokenizer.all_special_ids) | frozenset(
        i for i, t in tokenizer.added_tokens_decoder.items() if t.special)

  def __call__(self, batch, indices):
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    if self.cfg.format == "text":
      texts = [self._string(r, i, self.cfg.text_field) for r, i in zip(rows, indices)]
      encoded = self._plain([""] * len(texts), texts)
    elif self.template is None:
      prompts = [self._string(r, i, self.cfg.prompt_field) for r, i in zip(rows, indices)]
      responses = [self._string(r, i, self.cfg.response_field) for r, i in zip(rows, indices)]
      encoded = self._plain(prompts, responses)
    else:
      encoded = self._chat([self._conversation(r, i) for r, i in zip(rows, indices)], indices)
    return _columns(encoded)

  def encode(self, row, index=0):
    """One row -> (input_ids, trained) lists."""
    out = self({k: [v] for k, v in row.items()}, [index])
    return out["input_ids"][0], out["trained"][0]

  def prompt_ids(self, prompt):
    """Token ids a model is given to answer `prompt` exactly as training examples present it:
    the rendered [system?, user] turns plus the generation prompt (or the prompt's tokens when
    data.chat_template='none')."""
    if self.template is None:
      return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
    text = self._render(self._with_system([{"role": "user", "content": prompt}]), True, None)
    return self.tokenizer(text, add_special_tokens=False)["input_ids"]

  # -- row readers

  def _string(self, row, index, key):
    value = get_field(row, key)
    if value is None:
      raise DataError(f"field {key!r} is missing in {self.locate(index)}")
    if not isinstance(value, str):
      where, kind = (self.locate.of_wrong_type(key, index, value)
                     if hasattr(self.locate, "of_wrong_type")
                     else (self.locate(index), type(value).__name__))
      raise DataError(f"field {key!r} in {where} is {kind}, expected a string")
    return value

  def _conversation(self, row, index):
    """-> (messages, indices of trained assistant turns or None for all tokens); [] if empty."""
    if self.cfg.format == "prompt_response":
      response = self._string(row, index, self.cfg.response_field)
      messages = [{"role": "user", "content": self._string(row, index, self.cfg.prompt_field)},
                  {"role": "assistant", "content": response}]
    else:
      messages = self._messages(row, index)
      if not messages:
        return [], []
    messages = self._with_system(messages)
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    if self.cfg.loss_on == "last_assistant":
      turns = turns[-1:]
    if any(_blank(messages[k]["content"]) for k in turns):
      return [], []
    return messages, None if self.cfg.loss_on == "all" else turns

  def _messages(self, row, index):
    key = self.cfg.messages_field
    value = get_field(row, key)
    where = self.locate(index)
    if value is None:
      raise DataError(f"field {key!r} is missing in {where}")
    if not isinstance(value, list):
      raise DataError(f"field {key!r} in {where} is {type(value).__name__}, expected a list of "
                      "{role, content} messages")
    messages = []
    for n, m in enumerate(value):
      if not isinstance(m, dict) or "role" not in m or "content" not in m:
        raise DataError(f"message {n} of {where} is not a {{role, content}} mapping: {str(m)[:80]}")
      if m["role"] not in ROLES:
        raise DataError(f"message {n} of {where} has unknown role {m['role']!r}; expected one of "
                        f"{', '.join(ROLES)}")
      if not isinstance(m["content"], str):
        raise DataError(f"message {n} ({m['role']}) of {where} has content of type "
                        f"{type(m['content']).__name__}, expected a string")
      messages.append({"role": m["role"], "content": m["content"]})
    if messages and not any(m["role"] == "assistant" for m in messages):
      raise DataError(f"{where} has no assistant turn (roles: "
                      f"{', '.join(m['role'] for m in messages)}); nothing to train on")
    return messages

  def _with_system(self, messages):
    if self.cfg.system_prompt and messages[0]["role"] != "system":
      return [{"role": "system", "content": self.cfg.system_prompt}] + messages
    return messages

  # -- encoders

  def _plain(self, prompts, responses):
    """tokens(prompt, with the tokenizer's leading specials) + tokens(response) + EOS."""
    tok = self.tokenizer
    p_ids = tok(prompts, add_special_tokens=True)["input_ids"]
    r_ids = tok(responses, add_special_tokens=False)["input_ids"]
    out = []
    for p, r, response in zip(p_ids, r_ids, responses):
      if _blank(response):
        out.append(([], []))
        continue
      ids = p + r + ([] if r and r[-1] == self.eos_id else [self.eos_id])
      untrained = 0 if self.cfg.loss_on == "all" else len(p)
      out.append((ids, [0] * untrained + [1] * (len(ids) - untrained)))
    return out

  def _chat(self, conversations, indices):
    """Renders each conversation and the prefixes that bound its trained turns, tokenises all in
    one call, and marks each trained turn from its generation prompt to its end-of-turn token."""
    texts, plans = [], []
    for (messages, turns), index in zip(conversations, indices):
      if not messages:
        plans.append(None)
        continue
      full = len(texts)
      texts.append(self._render(messages, False, index))
      bounds = []  # per trained turn: (text up to its generation prompt, text through the turn)
      for k in turns or ():
        start_text, end_text = len(texts), full
        texts.append(self._render(messages[:k], True, index))
        if k + 1 < len(messages):
          end_text = len(texts)
          texts.append(self._render(messages[:k + 1], False, index))
        bounds.append((start_text, end_text))
      plans.append((full, bounds, turns is None))
    ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    out = []
    for plan, index, (messages, turns) in zip(plans, indices, conversations):
      if plan is None:
        out.append(([], []))
        continue
      full, bounds, train_all = plan
      full_ids = ids[full]
      trained = [int(train_all)] * len(full_ids)
      for (start_text, end_text), k in zip(bounds, turns or ()):
        start = self._prefix_len(ids[start_text], full_ids, k, index)
        end = self._prefix_len(ids[end_text], full_ids, k, index)
        stop = self._end_of_turn(full_ids, start, end, k, index)
        trained[start:stop + 1] = [1] * (stop + 1 - start)
      out.append((full_ids, trained))
    return out

  def _render(self, messages, generation_prompt, index):
    try:
      return self.tokenizer.apply_chat_template(
          messages, chat_template=self.template, tokenize=False,
          add_generation_prompt=generation_prompt)
    except jinja2.TemplateError as e:
      where = "the prompt" if index is None else self.locate(index)
      raise DataError(f"the chat template failed on {where}: {e}") from None

  def _prefix_len(self, prefix_ids, full_ids, turn, index):
    if full_ids[:len(prefix_ids)] != prefix_ids:
      raise DataError(
          f"the chat template is not prefix-stable at message {turn} of {self.locate(index)}: the "
          "conversation rendered up to that turn tokenises differently from the same turns inside "
          "the whole conversation (the template re-renders earlier turns, or tokens merge across "
          "the turn boundary), so the trained span cannot be located; use another "
          "data.chat_template, or data.loss_on='all'")
    return len(prefix_ids)

  def _end_of_turn(self, ids, start, end, turn, index):
    for i in range(end - 1, start - 1, -1):
      if ids[i] in self.special_ids:
        return i
    raise DataError(
        f"the chat template ends assistant message {turn} of {self.locate(index)} with no special "
        "end-of-turn token, so the model could never learn to stop; use a template that closes "
        "assistant turns with one (e.g. the tokenizer's EOS)")


def _blank(text):
  return not text.strip()


def _columns(encoded):
  cols = {c: [] for c in COLUMNS}
  for ids, trained in encoded:
    if trained:
      trained[0] = 0  # the first token has no context to be predicted from
    cols["input_ids"].append(ids)
    cols["trained"].append(trained)
    cols["num_tokens"].append(len(ids))
    cols["num_trained"].append(sum(trained))
    cols["first_trained"].append(trained.index(1) if 1 in trained else -1)
  return cols
