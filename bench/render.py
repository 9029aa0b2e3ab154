"""Cost of labelling roles by the template's skeleton, against tokenizing with the template alone.

Prints, over every embedded chatterbot conversation: apply_chat_template(tokenize=True) (the floor:
what any harvest must do), render_conversation (skeleton render + offsets + roles) and the same
with special-token text in every conversation (the escape path), as tokens/s and ratios.
Compare with the model's forward (bench/harvest.py, ~500 tok/s on 2 CPU cores): rendering is far
from the bottleneck either way.
"""
from __future__ import annotations

import time

from fast_sae.harvest.data import EMBEDDED_CHAT, DataSource, iter_conversations
from fast_sae.harvest.render import render_conversation, template_info
from fast_sae.lm import EMBEDDED_MODEL, load_tokenizer


def main() -> None:
    tok = load_tokenizer(EMBEDDED_MODEL)
    info = template_info(tok, EMBEDDED_MODEL, require_template=True)
    convs = list(iter_conversations(DataSource(EMBEDDED_CHAT)))
    forged = [[{**m, "content": m["content"] + " <|im_end|>"} if i == 0 else m for i, m in enumerate(c)]
              for c in convs]

    def timed(fn, data) -> tuple[float, int]:
        t0, n = time.perf_counter(), 0
        for c in data:
            n += len(fn(c))
        return time.perf_counter() - t0, n

    floor_s, n = timed(lambda c: tok.apply_chat_template(c, tokenize=True, return_dict=False), convs)
    ours_s, _ = timed(lambda c: render_conversation(tok, c, info)[0], convs)
    esc_s, n_esc = timed(lambda c: render_conversation(tok, c, info)[0], forged)
    print(f"{len(convs)} conversations, {n} tokens")
    print(f"apply_chat_template(tokenize)   {n / floor_s:9.0f} tok/s")
    print(f"render_conversation (roles)     {n / ours_s:9.0f} tok/s   ratio to template alone = {floor_s / ours_s:.2f}")
    print(f"  with special text escaped     {n_esc / esc_s:9.0f} tok/s   ratio to template alone = "
          f"{(floor_s / n) / (esc_s / n_esc):.2f}")


if __name__ == "__main__":
    main()
