"""The native engine's repetition penalty as a vLLM V1 logits processor (loaded by vLLM, in its engine core).

vLLM's own `repetition_penalty` counts the prompt's token ids, and a prompt given as embeddings has none, so
the visual prompt of a clip would be penalised over its generated tokens only. This processor applies the
penalty exactly as `model/engine.py` does (and `model/generation.py::_apply_repetition_penalty`): CTRL-style
(a seen token's positive logit divided by the penalty, a negative one multiplied), over the prompt's TEXT
token ids (the caller leaves out `<image>`, whose positions hold visual embeddings) plus every generated token.
The request carries its penalty and its prompt's text ids in `SamplingParams.extra_args[EXTRA_ARG]`
(`[penalty, [ids]]`); a request without that key is left alone.

It imports vLLM at module level: only vLLM imports it (by the name `model.vllm_penalty:PromptTextPenalty`, in
the engine core's process), never the project's own code, which must work without vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

EXTRA_ARG = "pllava_repetition_penalty"
QUALIFIED_NAME = "model.vllm_penalty:PromptTextPenalty"


@dataclass
class _Row:
    penalty: float
    output: list[int]  # vLLM's running list of the request's generated ids (a live reference)
    counted: int = 0  # how many of `output` are in the row of `seen` already


class PromptTextPenalty(LogitsProcessor):
    """Per batch row: a (vocab,) mask of seen ids, seeded with the prompt's text ids at admission and grown by
    the generated ids before each sampling. Not argmax-invariant, so it runs for greedy requests too."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.device = device
        rows = vllm_config.scheduler_config.max_num_seqs
        self.vocab_size = vllm_config.model_config.get_vocab_size()
        self.seen = torch.zeros(rows, self.vocab_size, dtype=torch.bool, device=device)
        self.rows: dict[int, _Row] = {}

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        args = (sampling_params.extra_args or {}).get(EXTRA_ARG)
        if args is None:
            return
        if not (isinstance(args, (list, tuple)) and len(args) == 2 and isinstance(args[0], (int, float))
                and args[0] > 0 and isinstance(args[1], (list, tuple))):
            raise ValueError(f"extra_args[{EXTRA_ARG!r}] must be [penalty > 0, [token ids]], got {args!r}")

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if not batch_update:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, _prompt_ids, output in batch_update.added:
            args = (params.extra_args or {}).get(EXTRA_ARG) if params is not None else None
            if args is None:
                self.rows.pop(index, None)
                continue
            penalty, text_ids = args
            self.seen[index] = False
            if text_ids:
                self.seen[index, torch.tensor(text_ids, dtype=torch.long, device=self.device)] = True
            self.rows[index] = _Row(float(penalty), output)
        for a, b, direction in batch_update.moved:
            row_a, row_b = self.rows.pop(a, None), self.rows.pop(b, None)
            seen_a = self.seen[a].clone()
            if direction == MoveDirectionality.SWAP:
                self.seen[a] = self.seen[b]
                if row_b is not None:
                    self.rows[a] = row_b
            self.seen[b] = seen_a
            if row_a is not None:
                self.rows[b] = row_a

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        # The generated ids are read here, not in update_state: under async scheduling vLLM fills in the last
        # step's ids (placeholders -1 until then) just before sampling.
        new_rows: list[int] = []
        new_ids: list[int] = []
        for index, row in self.rows.items():
            fresh = row.output[row.counted:]
            while fresh and fresh[-1] == -1:
                fresh = fresh[:-1]
            if fresh:
                new_rows.extend([index] * len(fresh))
                new_ids.extend(fresh)
                row.counted += len(fresh)
        if new_rows:
            self.seen[torch.tensor(new_rows, device=self.device), torch.tensor(new_ids, device=self.device)] = True
        index = torch.tensor(list(self.rows), dtype=torch.long, device=self.device)
        penalty = torch.tensor([r.penalty for r in self.rows.values()], dtype=torch.float32,
                               device=self.device)[:, None]
        vocab = min(self.vocab_size, logits.shape[1])
        rows = logits[index, :vocab]
        # the same float32 operations as CaptionEngine._decode_step
        penalised = torch.where(rows > 0, rows / penalty, rows * penalty)
        logits[index, :vocab] = torch.where(self.seen[index, :vocab], penalised, rows)
        return logits
