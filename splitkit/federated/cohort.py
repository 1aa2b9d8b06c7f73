"""A class of students trained side by side: one adapter each on one frozen model, every row through its own.

A Cohort is the unsplit model with LoRA on the blocks a split client trains (the Bottom's and the Top's) and
one PEFT adapter per student. PEFT's mixed-adapter batches (`adapter_names`) send each row of a batch through
its own adapter, so one forward and one backward train the whole class, and each adapter gets the gradient it
would get alone (tests/test_cohort.py). In `full` mode the split's gradients are the unsplit model's, so a
Cohort computes rounds of notebook 09's split federation for many arms and seeds at the cost of one batch.
Many LoRA adapters fine-tuned on one shared base model: Ye et al., "mLoRA" (2023).
"""

import copy

import torch
from torch import nn
from transformers import DynamicCache

from ..core.data import encode
from ..core.lora import LoraSpec, init_lora, lora_parameters, unsplit_reference
from ..training.train import criterion


class Cohort:
    """Adapters `names` on one frozen copy of `model`, LoRA where a split client at `cuts` has it, all from the
    same seeded init (`lora`), as every student of a federation starts."""

    def __init__(self, model, cuts, lora: LoraSpec, names: list[str]):
        self.names, self.lora = list(names), lora
        self.model = unsplit_reference(copy.deepcopy(model), cuts, lora, train_trunk=False)
        self.model.eval()  # as every model of the kit: PEFT mixes adapters in a batch only outside training mode
        for name in self.names:  # the same LoraConfig (the same blocks) and the same seeded init as "default"
            self.model.add_adapter(name, copy.deepcopy(self.model.peft_config["default"]))
            init_lora(self.model, lora, name)
        self.model.set_adapter(self.names[0])
        self.model.delete_adapter("default")
        self.params = {name: dict(lora_parameters(self.model, name)) for name in self.names}
        self.optimizers = {}

    def state(self, name: str) -> dict:
        """{'12.self_attn.q_proj.lora_A': tensor, ...} of one adapter, named as Learner.lora_state names them."""
        return {key: w.detach().clone() for key, w in self.params[name].items()}

    def load(self, name: str, state: dict):
        with torch.no_grad():
            for key, w in self.params[name].items():
                w.copy_(state[key])

    def new_optimizers(self, settings: dict):
        """{name: (lr, freeze_a)}: a fresh AdamW for each adapter named (as Learner.load_lora gives every round),
        over its lora_B alone when freeze_a (FFA-LoRA); the others keep theirs."""
        for name, (lr, freeze_a) in settings.items():
            trained = [w for key, w in self.params[name].items() if not (freeze_a and key.endswith(".lora_A"))]
            for key, w in self.params[name].items():
                w.requires_grad_(not (freeze_a and key.endswith(".lora_A")))
            self.optimizers[name] = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)

    def step(self, tokenizer, batches: dict) -> dict:
        """One training step of every adapter in `batches` ({name: [(prompt, answer), ...]}), in one forward and
        backward; each adapter's loss is the mean over its own rows' answer tokens. Returns {name: loss}."""
        rows, names, spans = [], [], {}
        for name, pairs in batches.items():
            spans[name] = slice(len(rows), len(rows) + len(pairs))
            rows += pairs
            names += [name] * len(pairs)
        batch = encode(tokenizer, rows)
        for name in batches:
            self.optimizers[name].zero_grad(set_to_none=True)
        logits, labels = self.logits(batch, names)
        losses = {name: criterion(logits[s], labels[s]) for name, s in spans.items()}
        sum(losses.values()).backward()  # the adapters share no parameter: each gets its own loss's gradient
        for name in batches:
            self.optimizers[name].step()
        return {name: loss.item() for name, loss in losses.items()}

    @torch.no_grad()
    def score(self, tokenizer, pairs: list, names: list[str]) -> dict:
        """{name: {"loss": per pair, "exact": per pair}} of each adapter on `pairs`, teacher-forced as
        train.evaluate: exact when every answer token and the end token is the argmax given those before it."""
        batch = encode(tokenizer, pairs * len(names))
        logits, labels = self.logits(batch, [n for n in names for _ in pairs])
        hit = ((logits[:, :-1].argmax(-1) == labels[:, 1:]) | (labels[:, 1:] == -100)).all(dim=1)  # (rows,)
        loss = [float(criterion(logits[i:i + 1], labels[i:i + 1])) for i in range(len(labels))]
        n = len(pairs)
        return {name: {"loss": loss[j * n:(j + 1) * n], "exact": hit[j * n:(j + 1) * n].tolist()}
                for j, name in enumerate(names)}

    def logits(self, batch: dict, names: list[str]) -> tuple:
        """The logits of the positions from the one before the first label on, and their labels: the LM head (49,152
        × 576 in SmolLM2) runs only where a loss is taken (transformers' logits_to_keep); the loss is the same."""
        labels = batch["labels"]  # (rows, T)
        first = int((labels != -100).any(0).nonzero().min()) - 1  # the position that predicts the first label
        keep = torch.arange(first, labels.shape[1])
        logits = self.model(input_ids=batch["input_ids"], adapter_names=names, logits_to_keep=keep).logits
        return logits, labels[:, first:]  # (rows, T - first, vocab), (rows, T - first)

    @torch.no_grad()
    def answer_losses(self, tokenizer, questions: list, candidates: list, name: str) -> torch.Tensor:
        """(questions, candidates): the loss of each candidate answer to each question under adapter `name`, the
        loss score() gives the pair (question, answer). The questions run once (left-padded, with transformers'
        mask and positions), and their KV cache, repeated, serves every candidate: what is shared is not
        recomputed."""
        eos, n = tokenizer.eos_token_id, len(candidates)
        prompts = [tokenizer(q, add_special_tokens=False).input_ids for q in questions]
        answers = [tokenizer(c, add_special_tokens=False).input_ids + [eos] for c in candidates]
        P, width = max(map(len, prompts)), max(map(len, answers))
        ids = torch.tensor([[eos] * (P - len(p)) + p for p in prompts])  # (Q, P), left-padded
        mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])  # (Q, P)
        cache = DynamicCache(config=self.model.config)
        first = self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                           past_key_values=cache, use_cache=True, adapter_names=[name] * len(prompts),
                           logits_to_keep=1).logits  # (Q, 1, vocab): predicts each answer's first token
        cache.batch_repeat_interleave(n)  # rows q·n … q·n + n − 1 continue question q
        tails = torch.tensor([a + [eos] * (width - len(a)) for a in answers]).repeat(len(prompts), 1)  # (Q·C, width)
        labels = torch.tensor([a + [-100] * (width - len(a)) for a in answers]).repeat(len(prompts), 1)
        rest = self.model(input_ids=tails,
                          attention_mask=torch.cat([mask.repeat_interleave(n, 0), torch.ones_like(tails)], dim=1),
                          position_ids=mask.sum(1).repeat_interleave(n)[:, None] + torch.arange(width),
                          past_key_values=cache, use_cache=True, adapter_names=[name] * len(tails)).logits
        logits = torch.cat([first.repeat_interleave(n, 0), rest[:, :-1]], dim=1)  # (Q·C, width, vocab): of labels
        tokens = nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
        return (tokens.sum(1) / (labels != -100).sum(1)).view(len(prompts), n)  # each answer's mean, as criterion

    @torch.no_grad()
    def answers(self, tokenizer, prompts: list, names: list[str], max_new_tokens: int = 8) -> dict:
        """{name: the greedy answer to each prompt under adapter `name`, up to its end token}: transformers'
        generate on the prompts left-padded, every adapter's rows in one batch."""
        rows = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
        width, pad = max(map(len, rows)), tokenizer.eos_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows] * len(names))  # (names · P, T)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows] * len(names))  # (names · P, T)
        new = self.model.generate(input_ids=ids, attention_mask=mask, adapter_names=[n for n in names for _ in rows],
                                  max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=pad,
                                  pad_token_id=pad)[:, width:]  # (names · P, ≤ max_new_tokens)
        said = [tokenizer.decode(row, skip_special_tokens=True) for row in new]
        return {name: said[j * len(rows):(j + 1) * len(rows)] for j, name in enumerate(names)}
