"""vLLM rollout backend (`rollout=vllm`): the same `RolloutBackend` as HF generate.

The engine runs in this process (colocated with the learner). It starts from the learner's
current weights, saved (`save_untied`) into `<run>/vllm_weights/`, and after every
`rollout.sync_every` optimizer steps vLLM's `reload_weights` loads the learner's weights in place:
handed over in memory as (name, tensor) pairs on their own device (`rollout.weight_sync=memory`:
the engine runs in this process, `VLLM_ENABLE_V1_MULTIPROCESSING=0`, so nothing is copied to a
file or serialised), or written to that folder again and read back (`rollout.weight_sync=disk`,
and always when vLLM was told to run its engine in another process). Across processes (NCCL/IPC
on GPU) no memory path is implemented. Sampled-token log-probs
come from vLLM (`logprobs=0`, raw = the model's own distribution) when the temperature is 1;
otherwise they are left to the learner.

`rollout.sleep=true` (CUDA only): the engine sleeps after each generation, so the learner has the
GPU memory, and wakes before it is next used — level 2 (weights discarded, KV cache freed) where
every update reloads the weights anyway (`rollout.sync_every=1`): nothing is copied out to CPU
memory and back only to be overwritten; level 1 (weights kept in CPU memory) otherwise. Not
exercised in CI (this CPU build has no sleep mode; tests/test_vllm_sleep.py checks the order).
"""

from __future__ import annotations

import json
import os
import weakref
from pathlib import Path

import torch

from opd_exp.config import ConfigError
from opd_exp.config.registry import vllm_in_process
from opd_exp.core.protocols import RolloutBackend
from opd_exp.core.types import Rollouts, Sampling, rollouts_from_samples


class VLLMSampler:
    """Sampling from an in-process vLLM engine `llm` (fixed weights: e.g. the teacher's)."""

    def __init__(self, llm, tokenizer, stop_ids: set[int], sleep: bool = False,
                 vocab_size: int | None = None, rows: int | None = None):
        """`vocab_size`: set for a model with padded embedding rows (`rows` of them) — only the
        tokenizer's real tokens may be sampled (vLLM samples over every row otherwise)."""
        self.llm, self.tokenizer, self.stop_ids = llm, tokenizer, sorted(stop_ids)
        # the engine's kernels run in the calling thread (not in vLLM's engine process)
        self.kernels_in_process = vllm_in_process()
        self.sleep, self.asleep = sleep, False
        self.sleep_level = 1  # the weights are kept (a fixed model's engine: the teacher's)
        self.excluded = excluded_rows(vocab_size, rows) if vocab_size and rows else {}

    def _wake(self) -> None:
        if self.asleep:
            if torch.cuda.is_available():  # what the learner freed goes back to the driver, for
                torch.cuda.empty_cache()  # vLLM's own allocator to take on waking
            self.llm.wake_up()
            self.asleep = False

    def sync_weights(self, model: torch.nn.Module) -> None:
        pass

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], s: Sampling) -> Rollouts:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        want_logp = s.temperature == 1.0
        # No per-request seed: seeded requests crash vLLM's CPU sampler once a batch needs more
        # than one scheduling step ("CPU Generator does not use offset"); the engine is seeded
        # once (trainer.seed) at start, so vLLM rollouts are reproducible per run, not per step.
        params = SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p,
                                top_k=s.top_k if s.top_k > 0 else -1, max_tokens=s.max_new_tokens,
                                stop_token_ids=self.stop_ids, logprobs=0 if want_logp else None,
                                detokenize=False, **self.excluded)
        self._wake()
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                                 use_tqdm=False)
        if self.sleep:  # give the learner the memory until the engine is next needed
            self.llm.sleep(level=self.sleep_level)
            self.asleep = True
        samples = [[(list(c.token_ids),
                     [st[t].logprob for st, t in zip(c.logprobs, c.token_ids)] if want_logp else None)
                    for c in out.outputs] for out in outs]
        return rollouts_from_samples(prompts, samples, self.tokenizer.pad_token_id, self.stop_ids)


MAX_BIASED_ROWS = 1024  # vLLM's GPU sampler (model runner v2) takes at most 1,024 logit-bias ids


def excluded_rows(vocab_size: int, rows: int) -> dict:
    """SamplingParams keywords that keep the padded rows past the tokenizer's `vocab_size` from
    ever being sampled: a -inf logit bias on those few rows (Qwen3: 267; every request carried
    all 151,669 allowed ids before, and vLLM's v2 GPU sampler takes at most 1,024 of either). The
    returned log-probs are the raw model's, unaffected. More padded rows than that are refused
    (the allowed ids would be even more)."""
    if rows - vocab_size > MAX_BIASED_ROWS:
        raise ConfigError(f"a vLLM engine is not allowed to sample from a model with {rows - vocab_size} "
                          f"padded rows past its {vocab_size} tokens: vLLM's GPU sampler excludes "
                          f"at most {MAX_BIASED_ROWS}; rollout=hf / teacher=hf sample over the real "
                          "tokens only")
    return {"logit_bias": {i: float("-inf") for i in range(vocab_size, rows)}}


class VLLMRollout(VLLMSampler):
    """The student's engine: started from the learner's weights, which it follows."""

    def __init__(self, model: torch.nn.Module, tokenizer, stop_ids: set[int], work_dir: Path,
                 dtype: str, max_model_len: int, gpu_memory_utilization: float, sync_every: int,
                 seed: int, sleep: bool = False, weight_sync: str = "memory", kv_cache_mib: int = 0,
                 enforce_eager: bool = True, engine_kw: dict | None = None, sleep_level: int = 1):
        """`sleep_level` 2 (weights discarded while asleep) only where every sampling follows a
        sync of the last update (`sync_every=1`, no sampling ahead)."""
        self.weights_dir = Path(work_dir) / "vllm_weights"
        save_untied(model, self.weights_dir)
        tokenizer.save_pretrained(self.weights_dir)
        kw = {"max_model_len": max_model_len} if max_model_len else {}
        kw.update(engine_kw or {})
        if sleep:
            kw["enable_sleep_mode"] = True
        if kv_cache_mib:
            kw["kv_cache_memory_bytes"] = kv_cache_mib * 2**20
        rows = model.get_output_embeddings().weight.shape[0]
        super().__init__(start_engine(str(self.weights_dir), dtype, gpu_memory_utilization,
                                      enforce_eager, seed=seed,
                                      record=Path(work_dir) / "vllm_engine.json", **kw),
                         tokenizer, stop_ids, sleep,
                         vocab_size=len(tokenizer) if rows > len(tokenizer) else None, rows=rows)
        self.sync_every, self.calls, self.weight_sync = sync_every, 0, weight_sync
        self.sleep_level, self.model = sleep_level, model

    def _wake(self, reload: bool = True) -> None:
        """Level 2 discarded the weights: the learner's current ones are loaded back on waking
        (the same ones a sync would push: every sampling follows the last update's sync)."""
        lost = self.asleep and self.sleep_level == 2
        super()._wake()
        if lost and reload:
            self._load(self.model)

    def sync_weights(self, model: torch.nn.Module) -> None:
        self.calls += 1
        if self.calls % self.sync_every:
            return
        self._wake(reload=False)
        self._load(model)

    def _load(self, model: torch.nn.Module) -> None:
        self.model = model
        if self.weight_sync == "memory" and vllm_in_process():
            source = {"weights_iterator": named_weights(model)}
        else:
            save_untied(model, self.weights_dir)
            source = {"weights_path": str(self.weights_dir)}
        self.llm.collective_rpc("reload_weights", kwargs={**source, "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights


def start_engine(path: str, dtype: str, gpu_memory_utilization: float, enforce_eager: bool = True,
                 record: Path | None = None, **kw):
    """An in-process vLLM engine (eager: starts in seconds, ENGINES.md; else compiled at start,
    faster to decode). `generation_config="vllm"`: the model's generation_config.json never
    supplies sampling defaults — every request carries exactly the configured SamplingParams (as
    the server, `--generation-config vllm`). Under a launcher with several ranks each rank's
    engine is its own, on the rank's device (`launcher_kwargs`), checked once built
    (`check_engine_device`). `record`: a JSON file that keeps the engine's arguments and device."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    args = dict(model=path, dtype=dtype, enforce_eager=enforce_eager, generation_config="vllm",
                gpu_memory_utilization=gpu_memory_utilization, **launcher_kwargs(), **kw)
    llm = LLM(**args)
    _STARTED.append(weakref.ref(llm))
    device, worker_rank = check_engine_device(llm)
    if record is not None:
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({**args, "device": device, "rank": os.environ.get("RANK", "0"),
                                      "worker_rank": worker_rank}, indent=2, default=str))
    return llm


_STARTED: list[weakref.ref] = []  # the engines start_engine made in this process, in order


def shutdown_engines() -> int:
    """Shut down, newest first, every in-process engine `start_engine` made that is still alive
    (vLLM's `EngineCoreClient.shutdown`), at the end of a run (finished or failed). Each engine
    would otherwise tear down vLLM's distributed state from a weakref finalizer at interpreter
    exit, after `Dist.close` / `restore_env` destroyed the default group under it (`ValueError:
    Invalid process group specified`), and in a sweep the finished run's engines would keep their
    memory while the next run starts its own. The shutdown itself destroys vLLM's groups and the
    default group, which vLLM joined where one existed (torchrun's, DeepSpeed's group of one): no
    collective may follow it. Returns how many were shut down."""
    done = 0
    while _STARTED:
        llm = _STARTED.pop()()
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            done += 1
    return done


def launcher_kwargs() -> dict:
    """In a job of several ranks (torchrun's WORLD_SIZE > 1): vLLM's external launcher, which
    takes the rank and local rank from the environment (RANK / LOCAL_RANK), puts the engine on
    the rank's GPU and names its compile cache by the rank (`rank_<RANK>_0`). vLLM's default
    single-process executor would take local rank 0 on every rank — all engines on cuda:0, made
    the current device of every trainer process — and one compile-cache folder for all
    (`rank_0_0`). It needs VLLM_ENABLE_V1_MULTIPROCESSING=0, as every engine here."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return {"distributed_executor_backend": "external_launcher"}
    return {}


def _worker_place(worker) -> tuple[str, int]:
    """(device, rank) of an engine's worker; the rank names its compile cache (rank_<rank>_0)."""
    return str(worker.device), int(worker.rank)


def check_engine_device(llm) -> tuple[str, int]:
    """The rank's own device (cuda:<LOCAL_RANK>, or the CPU) made current again after the engine
    was built (vLLM's worker sets it; the learner allocates on the current device), and the
    engine's worker checked to be on it. Returns (the worker's device, its rank)."""
    cuda = torch.cuda.is_available()
    want = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(want)
    places = llm.collective_rpc(_worker_place)
    got = [torch.device(d) for d, _ in places]
    if any(d != want for d in got):
        raise RuntimeError(f"the vLLM engine of rank {os.environ.get('RANK', 0)} runs on "
                           f"{', '.join(map(str, got))}, not on this rank's {want}")
    return places[0]


def hub_source(revision: str | None, trust_remote_code: bool) -> dict:
    """vLLM's keywords for the model's pinned revision (weights and tokenizer) and remote code, as
    a ModelConfig sets them for the HF loaders (engines/hf_models.py)."""
    kw = {"revision": revision, "tokenizer_revision": revision} if revision else {}
    return {**kw, "trust_remote_code": True} if trust_remote_code else kw


def named_weights(model: torch.nn.Module):
    """(name, tensor) pairs of the model's weights on their own device, no copy; a tied LM head
    once more as `lm_head.weight` (the engine's head is untied, see save_untied)."""
    names = set()
    for name, t in model.state_dict().items():
        names.add(name)
        yield name, t.detach()
    if "lm_head.weight" not in names:
        yield "lm_head.weight", model.get_output_embeddings().weight.detach()


def untied_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights on the CPU by name, a tied LM head as its own `lm_head.weight`."""
    tensors, seen = {}, set()
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        tensors[name] = t.clone() if t.data_ptr() in seen else t  # tied: its own copy
        seen.add(t.data_ptr())
    if "lm_head.weight" not in tensors:
        tensors["lm_head.weight"] = model.get_output_embeddings().weight.detach().cpu().clone()
    return tensors


def save_untied(model: torch.nn.Module, out: Path) -> None:
    """The model's weights (one safetensors file) and config, with an explicit `lm_head.weight`
    and `tie_word_embeddings: false`.

    vLLM's in-place reload does not reload a tied LM head (it keeps the CPU kernel's packed copy
    of the old one), so the engine is given an untied model whose head is loaded like any layer.
    Written here rather than by `save_pretrained`, which writes on global rank 0 only: every
    rank of a launched job feeds its own engine."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file(untied_tensors(model), out / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config["tie_word_embeddings"] = False
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.to_json_file(out / "generation_config.json")


def batching_kwargs(max_num_batched_tokens: int, max_num_seqs: int = 0) -> dict:
    """vLLM's scheduler limits where set (0: vLLM's own defaults)."""
    kw = {"max_num_batched_tokens": max_num_batched_tokens} if max_num_batched_tokens else {}
    return {**kw, "max_num_seqs": max_num_seqs} if max_num_seqs else kw


def make(cfg, model, tokenizer, stop_ids, work_dir, rank: int = 0) -> RolloutBackend:
    r = cfg.rollout
    return VLLMRollout(model, tokenizer, stop_ids, work_dir, dtype=r.dtype or cfg.pair.student.dtype,
                       max_model_len=r.max_model_len, gpu_memory_utilization=r.gpu_memory_utilization,
                       sync_every=r.sync_every, seed=cfg.trainer.seed + 7_919 * rank,
                       sleep=r.sleep, weight_sync=r.weight_sync, kv_cache_mib=r.kv_cache_mib,
                       enforce_eager=r.enforce_eager,
                       engine_kw=batching_kwargs(r.max_num_batched_tokens, r.max_num_seqs),
                       sleep_level=2 if r.sync_every == 1 and r.max_staleness == 0 else 1)
