"""Generation through the split with KV caches: the unsplit model's tokens, a lost cache recovered, memory bounded."""

import time

import pytest
import torch
from peft.tuners.lora import LoraLayer
from transformers.generation.streamers import BaseStreamer

from splitkit import Learner, TrunkError, generate
from splitkit.core.data import batches, facts
from splitkit.core.lora import lora_layers
from splitkit.training.generation import generate_ids
from splitkit.trunk.sessions import Limits
from splitkit.wire import protocol as P

NEW = 10


def cuts_of(model):
    return (1, model.config.num_hidden_layers - 1)


def padded_prompts(model, lengths=(4, 7, 2), seed=0):
    """Left-padded random prompts (B, T) and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, model.config.vocab_size, (len(lengths), width), generator=g)
    mask = (torch.arange(width)[None] >= torch.tensor([width - n for n in lengths])[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("mode", ["full", "full+trunk"])
def test_cached_split_generation_gives_the_unsplit_models_greedy_tokens(tiny, serve, spec, mode):
    model, _ = tiny
    cuts = cuts_of(model)
    address = serve(model, cuts)
    ids, mask = padded_prompts(model)
    with Learner(model, mode=mode, cuts=cuts, address=address, lora=spec) as split:
        reference = Learner(model, mode="local", cuts=cuts, lora=spec, train_trunk=mode == "full+trunk")
        reference.load_lora(split.lora_state())  # in full+trunk, the Trunk LoRA the server drew
        reference.model.get_base_model().generation_config.eos_token_id = None  # all NEW tokens, as generate_ids
        want = reference.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                                        pad_token_id=0)[:, ids.shape[1]:]  # transformers' own generate(), cached
        cached = generate_ids(split, ids, mask, NEW)
        uncached = generate_ids(split, ids, mask, NEW, cache=False)
        sent = [m for m in split.client.messages if m["op"] == P.INFER]
    assert torch.equal(cached, want) and torch.equal(uncached, want)
    # after the prompt, one hidden state per row goes each way per token
    d = model.config.hidden_size
    assert [m["sent"] for m in sent] == [[[3, 7, d]]] + [[[3, 1, d]]] * (NEW - 1)
    assert [m["received"] for m in sent] == [[[3, 7, d]]] + [[[3, 1, d]]] * (NEW - 1)
    assert serve.servers[-1].stats()["generations"] == 0, "the finished generation's cache was not released"


def every_tensor(learner, server) -> dict:
    """A copy of every tensor of the client's parts and of the server's Trunk: base weights, each session's LoRA."""
    parts = {"bottom": learner.bottom, "top": learner.top, "trunk": server.sessions.trunk}
    return {f"{part}.{k}": v.detach().clone() for part, m in parts.items() for k, v in m.state_dict().items()}


class MergeProbe(BaseStreamer):
    """A streamer that, at each new token, notes what the generation has done to the weights: whether every client
    LoRA layer is merged, and how far each merged weight is from W + PEFT's delta and from W, on the client and in
    the server's merged copies of the Trunk's weights (put in place only while a request runs)."""

    def __init__(self, learner, server):
        self.learner, self.server, self.seen = learner, server, []
        self.originals = {id(m): m.get_base_layer().weight.detach().clone() for m in self._layers()}

    def _layers(self):
        parts = [self.learner.bottom, self.learner.top, self.server.sessions.peft]
        return [m for part in parts if part is not None for m in part.modules() if isinstance(m, LoraLayer)]

    def put(self, value):
        if value.dim() == 2:  # the prompt, before the generation began
            return
        client = [layer for part in (self.learner.bottom, self.learner.top) for layer in lora_layers(part).values()]
        merged = [(layer, "default", layer.get_base_layer().weight) for layer in client]
        gens = [g for g in self.server.sessions.get(self.learner.client.session).generations.values() if g.merged]
        merged += [(layer, g.merged.adapter, tensors[0]) for g in gens
                   for layer, tensors in zip(g.merged.layers, g.merged.weights, strict=True)]
        self.seen.append(dict(
            client_merged=all(layer.merged for layer in client), server_generations=len(gens),
            off_merge=max(float((w - self.originals[id(layer)] - layer.get_delta_weight(adapter)).abs().max())
                          for layer, adapter, w in merged),
            off_base=min(float((w - self.originals[id(layer)]).abs().max()) for layer, _, w in merged)))

    def end(self):
        pass


@pytest.mark.parametrize("mode", ["full", "full+trunk"])
def test_generation_merges_the_lora_and_leaves_every_weight_and_the_next_step_as_they_were(tiny, serve, spec, mode):
    model, tokenizer = tiny
    cuts = cuts_of(model)
    address = serve(model, cuts, lora_seed=0)  # the twin's Trunk LoRA starts as the learner's
    server = serve.servers[-1]
    ids, mask = padded_prompts(model)
    data = batches(tokenizer, facts(), 4, seed=2)
    first, second = next(data), next(data)
    with Learner(model, mode=mode, cuts=cuts, address=address, lora=spec, lr=1e-2) as learner, \
            Learner(model, mode=mode, cuts=cuts, address=address, lora=spec, lr=1e-2) as twin:
        assert learner.step(first) == twin.step(first)  # a trained LoRA on every part, and the twin's the same
        before = every_tensor(learner, server)
        probe = MergeProbe(learner, server)
        tokens = generate_ids(learner, ids, mask, NEW, streamer=probe)
        after = every_tensor(learner, server)
        # the tokens of transformers' generate() on the unsplit model with the same LoRA, not merged
        reference = Learner(model, mode="local", cuts=cuts, lora=spec, train_trunk=mode == "full+trunk")
        reference.load_lora(learner.lora_state())
        reference.model.get_base_model().generation_config.eos_token_id = None
        want = reference.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                                        pad_token_id=0)[:, ids.shape[1]:]
        assert torch.equal(tokens, want)
        # during the generation: every client LoRA layer merged, and in full+trunk the server's merged copies
        # made; each merged weight is W + PEFT's delta (to rounding) and is not W
        assert len(probe.seen) == NEW and all(s["client_merged"] for s in probe.seen)
        assert all(s["server_generations"] == (mode == "full+trunk") for s in probe.seen)
        assert all(s["off_merge"] < 1e-6 < s["off_base"] for s in probe.seen), probe.seen[0]
        # after it: every tensor on both sides bit for bit as before, nothing left merged, the next step the twin's
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        assert not any(layer.merged for part in (learner.bottom, learner.top) for layer in lora_layers(part).values())
        assert learner.step(second) == twin.step(second)
        assert all(torch.equal(a, b) for a, b in zip(learner.lora_state().values(), twin.lora_state().values(),
                                                     strict=True))


class Failing(BaseStreamer):
    """A streamer that raises at the `at`-th new token."""

    def __init__(self, at: int):
        self.at, self.tokens = at, 0

    def put(self, value):
        if value.dim() == 1:
            self.tokens += 1
            if self.tokens == self.at:
                raise RuntimeError("the streamer failed")

    def end(self):
        pass


@pytest.mark.parametrize("mode", ["full", "full+trunk"])
def test_a_generation_that_fails_midway_or_loses_its_cache_leaves_every_weight_as_it_was(llama, serve, spec, mode):
    cuts = cuts_of(llama)
    ids, mask = padded_prompts(llama)
    lossy = serve(llama, cuts, limits=Limits(generations_total=0))  # every token: the prefix again, merged again
    server = serve.servers[-1]
    with Learner(llama, mode=mode, cuts=cuts, address=lossy, lora=spec) as learner:
        before = every_tensor(learner, server)
        with pytest.raises(RuntimeError, match="the streamer failed"):
            generate_ids(learner, ids, mask, NEW, streamer=Failing(at=4))
        assert learner.client.resent == 3  # the tokens after the first lost their cache before the failure
        after = every_tensor(learner, server)
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert not any(layer.merged for part in (learner.bottom, learner.top) for layer in lora_layers(part).values())
        assert server.stats()["generations"] == 0


def test_a_lost_cache_is_answered_with_its_code_and_the_client_sends_the_prefix_again(llama, serve, client):
    cuts = cuts_of(llama)
    c = client(serve(llama, cuts))
    c.hello(llama, cuts, mode=P.FULL)
    h1 = torch.randn(2, 5, llama.config.hidden_size)
    c.infer(h1, gen=7, start=0, pad=[0, 2])
    assert c.release(7) and not c.release(7)
    with pytest.raises(TrunkError) as e:
        c.infer(h1[:, :1], gen=7, start=5)
    assert e.value.code == P.CACHE_MISSING and "send the whole prefix" in str(e.value)
    # with the prefix at hand the client recovers: the same h2 as one pass over the whole sequence
    again = c.infer(h1[:, 4:], gen=7, start=4, pad=[0, 2], prefix=h1[:, :4])
    whole = c.infer(h1, gen=8, start=0, pad=[0, 2])
    assert c.resent == 1 and torch.allclose(again, whole[:, 4:], atol=1e-5)


def test_a_server_that_keeps_no_cache_still_generates_the_same_tokens(llama, serve, spec):
    cuts = cuts_of(llama)
    ids, mask = padded_prompts(llama)
    with Learner(llama, mode="full", cuts=cuts, address=serve(llama, cuts), lora=spec) as kept, \
            Learner(llama, mode="full", cuts=cuts, address=serve(llama, cuts, limits=Limits(generations_total=0)),
                    lora=spec) as lost:
        want, got = generate_ids(kept, ids, mask, NEW), generate_ids(lost, ids, mask, NEW)
        assert torch.equal(got, want)
        assert kept.client.resent == 0 and lost.client.resent == NEW - 1  # every decode step lost its cache


def test_a_server_that_runs_generation_steps_on_one_thread_makes_the_same_tokens(llama, serve, spec, monkeypatch):
    """trunk_server.py runs a generation step of a few tokens on one thread (--one-thread-up-to): the same greedy
    tokens, and torch's threads back as they were after each step."""
    cuts, (ids, mask), threads, set_to = cuts_of(llama), padded_prompts(llama), torch.get_num_threads(), []
    set_threads = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: set_to.append(n) or set_threads(n))
    with Learner(llama, mode="full", cuts=cuts, address=serve(llama, cuts), lora=spec) as many, \
            Learner(llama, mode="full", cuts=cuts, address=serve(llama, cuts, one_thread_up_to=3), lora=spec) as one:
        want = generate_ids(many, ids, mask, NEW)
        assert set_to == []
        got = generate_ids(one, ids, mask, NEW)
    assert torch.equal(got, want) and torch.get_num_threads() == threads
    if threads > 1:  # each of the NEW - 1 one-token steps of 3 rows on one thread, and back; the prompt (3 x 7) not
        assert set_to == [1, threads] * (NEW - 1)


def watch_prefixes(client) -> dict:
    """Wrap client.infer to count what generation gives it as `prefix`: nothing, a tensor already joined, or a
    function, and how often infer called that function (joined the h1 history)."""
    counts = dict(none=0, tensor=0, lazy=0, joined=0)
    infer = client.infer

    def counted(h1, gen, start, pad=None, prefix=None):
        if prefix is None or isinstance(prefix, torch.Tensor):
            counts["none" if prefix is None else "tensor"] += 1
            return infer(h1, gen, start, pad, prefix)
        counts["lazy"] += 1

        def join():
            counts["joined"] += 1
            return prefix()
        return infer(h1, gen, start, pad, join)

    client.infer = counted
    return counts


def test_the_h1_history_is_joined_only_when_the_server_lost_the_cache(llama, serve, spec):
    cuts = cuts_of(llama)
    ids, mask = padded_prompts(llama)
    with Learner(llama, mode="full", cuts=cuts, address=serve(llama, cuts), lora=spec) as kept, \
            Learner(llama, mode="full", cuts=cuts, address=serve(llama, cuts, limits=Limits(generations_total=0)),
                    lora=spec) as lost:
        on_kept, on_lost = watch_prefixes(kept.client), watch_prefixes(lost.client)
        assert torch.equal(generate_ids(lost, ids, mask, NEW), generate_ids(kept, ids, mask, NEW))
    # the prompt goes with no prefix; each token after it with the history unjoined, joined only to be resent
    assert on_kept == dict(none=1, tensor=0, lazy=NEW - 1, joined=0)
    assert on_lost == dict(none=1, tensor=0, lazy=NEW - 1, joined=NEW - 1) and lost.client.resent == NEW - 1


def test_many_abandoned_generations_keep_server_memory_bounded(llama, serve, client):
    cuts = cuts_of(llama)
    limits = Limits(generations_per_session=3, generations_total=5, cached_tokens=200, generation_idle_s=0.5)
    address = serve(llama, cuts, limits=limits)
    server = serve.servers[-1]
    clients = [client(address) for _ in range(4)]
    d = llama.config.hidden_size
    for c in clients:
        c.hello(llama, cuts, mode=P.FULL)
        for gen in range(10):  # prompts that are never finished nor released
            c.infer(torch.randn(2, 8, d), gen=gen, start=0, pad=[0, 3])
            stats = server.stats()
            assert stats["generations"] <= 5 and stats["cached_tokens"] <= 200
            assert len(server.sessions.get(c.session).generations) <= 3
    # what a cache holds: keys and values (kv heads × head dim) of each Trunk block, per token
    config = llama.config
    per_token = 2 * (cuts[1] - cuts[0]) * config.num_key_value_heads * (d // config.num_attention_heads) * 4
    assert 0 < server.stats()["cache_bytes"] <= 200 * per_token
    with pytest.raises(TrunkError) as e:  # the first generation went long ago
        clients[0].infer(torch.randn(2, 1, d), gen=0, start=8)
    assert e.value.code == P.CACHE_MISSING
    time.sleep(0.6)
    clients[0].stats()  # any request lets the server sweep
    assert server.stats()["generations"] == 0 and server.stats()["cache_bytes"] == 0


def test_a_decode_step_must_continue_its_cache(llama, serve, client):
    cuts = cuts_of(llama)
    c = client(serve(llama, cuts, limits=Limits(max_tokens=40)))
    c.hello(llama, cuts, mode=P.FULL)
    d = llama.config.hidden_size
    cases = [(5, torch.randn(2, 1, d), 3, P.CACHE_MISSING, "it holds 2 x 5"),  # not where the cache ends
             (5, torch.randn(3, 1, d), 5, P.CACHE_MISSING, "for 3 x 5"),        # another batch
             (18, torch.randn(2, 3, d), 18, P.BAD_REQUEST, "2 x 21 positions is over this server's limit of 40"),
             (5, torch.randn(2, 1, d), 0, P.BAD_REQUEST, "'pad' must be a list of 2")]
    for prompt, h, start, code, message in cases:
        c.infer(torch.randn(2, prompt, d), gen=1, start=0)
        with pytest.raises(TrunkError, match=message) as e:
            c.infer(h, gen=1, start=start, pad=[0, 5] if "pad" in message else None)
        assert e.value.code == code
        assert serve.servers[-1].stats()["generations"] == 0  # a refused step leaves no cache behind


def test_sampling_is_seeded_stops_at_eos_and_streams(tiny, serve):
    model, tokenizer = tiny
    cuts = cuts_of(model)
    ids, mask = padded_prompts(model)
    with Learner(model, mode="full", cuts=cuts, address=serve(model, cuts)) as learner:
        sample = dict(temperature=1.5, top_p=0.95)
        one, again = (generate_ids(learner, ids, mask, NEW, seed=5, **sample) for _ in range(2))
        other = generate_ids(learner, ids, mask, NEW, seed=6, **sample)
        assert torch.equal(one, again) and not torch.equal(one, other)
        # EOS: the row that makes it stops (padded after it); when every row has, generation ends
        greedy = generate_ids(learner, ids, mask, NEW)
        eos = int(greedy[1, 2])
        stopped = generate_ids(learner, ids, mask, NEW, eos_token_id=eos, pad_token_id=0)
        row = greedy[1].tolist()
        assert stopped[1].tolist() == row[:row.index(eos) + 1] + [0] * (stopped.shape[1] - row.index(eos) - 1)
        assert generate_ids(learner, ids[1:2], mask[1:2], NEW, eos_token_id=eos).shape[1] == row.index(eos) + 1
        # streaming: a transformers streamer gets the prompt, then each token while the generation is under way
        server = serve.servers[-1]
        streamer = Recorder(lambda: server.stats()["generations"])
        got = generate_ids(learner, ids[:1], mask[:1], NEW, streamer=streamer)
        assert torch.equal(streamer.calls[0][1], ids[:1])
        assert [int(t) for _, t in streamer.calls[1:]] == got[0].tolist() and streamer.ended == 1
        assert all(held == 1 for held, _ in streamer.calls[1:])  # the cache was open: tokens came one by one
        assert server.stats()["generations"] == 0
        assert generate(learner, tokenizer, ["a"], 3)[0] == tokenizer.decode(generate_ids(
            learner, torch.tensor([tokenizer("a", add_special_tokens=False).input_ids]), None, 3,
            eos_token_id=tokenizer.eos_token_id)[0], skip_special_tokens=True)


class Recorder(BaseStreamer):
    """A streamer that notes each put, and what `probe()` said at that moment."""

    def __init__(self, probe):
        self.probe, self.calls, self.ended = probe, [], 0

    def put(self, value):
        self.calls.append((self.probe(), value))

    def end(self):
        self.ended += 1
