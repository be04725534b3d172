"""`teacher=vllm_server` against stand-in OpenAI servers (no vLLM): each answers /v1/completions
with the prompt log-probs the HF toy teacher gives, in vLLM's JSON shape — so the pool's split,
order, fall-over and retries are checked against the HF teacher itself. The same backend against
a real vLLM server: tests/test_vllm_server.py."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd_exp.core.types import Sampling
from opd_exp.engines.rollout_hf import HFRollout
from opd_exp.engines.rollout_vllm_server import request_json
from opd_exp.engines.teacher_hf import HFTeacher
from opd_exp.engines.teacher_vllm_server import VLLMServerTeacher

K = 5


class Stub:
    """An OpenAI-compatible server in a thread; `fail_first` requests answer 503 before it works,
    `dead=True` answers 503 always. `seen` counts the sequences each completion request carried."""

    def __init__(self, model, fail_first: int = 0, dead: bool = False, code: int = 503):
        self.model, self.fail_left, self.dead, self.seen, self.code = model, fail_first, dead, [], code
        self.bad = False  # answer 400 (a request the server refuses)
        self.short = False  # answer one position short of every sequence
        self.asked = []  # prompt_logprobs of each completion request
        self.failed = 0  # requests answered with an error
        self.token = None  # a shared secret: requests without `Authorization: Bearer <it>` get 401
        self.auth = []  # the Authorization header of every request
        self.root = "/models/Teacher-8B"  # the served model's folder (/v1/models)
        self.context = None  # its max_model_len on /v1/models (vLLM's model card has it)
        self.rpc = []  # the bodies of /collective_rpc and /reset_prefix_cache requests
        self.rpc_code = 200  # their answer
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def answer(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def refused(self) -> bool:
                stub.auth.append(self.headers.get("Authorization"))
                if stub.token and self.headers.get("Authorization") != f"Bearer {stub.token}":
                    self.answer(401, {"error": "Unauthorized"})
                    return True
                return False

            def do_GET(self):
                if not self.refused():
                    card = {"id": "teacher", "root": stub.root}
                    self.answer(200, {"data": [{**card, "max_model_len": stub.context} if stub.context else card]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.refused():
                    return
                if self.path in ("/collective_rpc", "/reset_prefix_cache"):
                    stub.rpc.append((self.path, body))
                    return self.answer(stub.rpc_code, {"error": "refused"} if stub.rpc_code != 200 else {})
                if stub.dead or stub.fail_left > 0:
                    stub.fail_left -= 1
                    stub.failed += 1
                    return self.answer(stub.code, {"error": "overloaded"})
                if "prompt_logprobs" not in body or stub.bad:
                    return self.answer(400, {"error": "bad request"})
                stub.seen.append(len(body["prompt"]))
                stub.asked.append(body["prompt_logprobs"])
                self.answer(200, {"choices": [stub.choice(i, seq[:-1] if stub.short else seq,
                                                          body["prompt_logprobs"])
                                              for i, seq in enumerate(body["prompt"])][::-1]})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @torch.no_grad()
    def choice(self, index: int, seq: list[int], k: int) -> dict:
        """vLLM's answer: prompt_logprobs[i] = {token id: {logprob, rank}} for token i (None at
        0): the token itself with its rank, and the top-k ranks 1..k."""
        logq = torch.log_softmax(self.model(torch.tensor([seq])).logits[0].float(), -1)
        out = [None]
        for i in range(1, len(seq)):
            row = logq[i - 1]
            order = row.argsort(descending=True)
            rank = {int(t): r + 1 for r, t in enumerate(order.tolist())}
            pos = {str(seq[i]): {"logprob": row[seq[i]].item(), "rank": rank[seq[i]]}}
            pos.update({str(int(t)): {"logprob": row[t].item(), "rank": r + 1}
                        for r, t in enumerate(order[:k])})
            out.append(pos)
        return {"index": index, "text": "", "prompt_logprobs": out}

    def close(self):
        self.server.shutdown()


@pytest.fixture
def stub():
    """make(model, **kw) → a Stub, shut down after the test."""
    made = []
    yield lambda *a, **kw: made.append(Stub(*a, **kw)) or made[-1]
    for s in made:
        s.close()


@pytest.fixture(scope="module")
def pair(tiny_world):
    tok = AutoTokenizer.from_pretrained(tiny_world / "student", padding_side="left")
    student = AutoModelForCausalLM.from_pretrained(tiny_world / "student")
    teacher = AutoModelForCausalLM.from_pretrained(tiny_world / "teacher").eval()
    prompts = [tok(f"<|im_start|>user\nCompute {a}+{b}.<|im_end|>\n<|im_start|>assistant\n",
                   add_special_tokens=False).input_ids for a, b in ((3, 4), (10, 20), (7, 1))]
    torch.manual_seed(0)
    rollouts = HFRollout(student, tok, {tok.eos_token_id}).generate(prompts, Sampling(n=3, max_new_tokens=16))
    rollouts.response_mask_B_T[0, 2] = 0  # a hole (special-token masking): still scored in order
    return tok, teacher, rollouts


def test_pool_scores_equal_the_hf_teacher_in_row_order(pair, stub):
    tok, teacher, r = pair
    stubs = [stub(teacher), stub(teacher)]
    server = VLLMServerTeacher([s.url for s in stubs], 30, 0, len(tok), len(tok))
    hf = HFTeacher(teacher, micro_batch_size=4, chunk_size=7)
    m = r.response_mask_B_T.bool()
    got, want = server.score(r, "sampled"), hf.score(r, "sampled")
    assert (got.logp_B_T - want.logp_B_T)[m].abs().max() <= 1e-5
    assert [s.seen for s in stubs] == [[4], [5]]  # 9 rows: one contiguous share per replica
    got, want = server.score(r, "topk", K), hf.score(r, "topk", K)
    assert torch.equal(got.topk_idx_B_T_K[m], want.topk_idx_B_T_K[m])
    assert (got.topk_logq_B_T_K - want.topk_logq_B_T_K)[m].abs().max() <= 1e-5
    assert (got.topk_logq_B_T_K[~m] == 0).all()


def test_a_failing_replica_is_retried_then_its_share_moves_on(pair, stub):
    tok, teacher, r = pair
    flaky, dead, good = stub(teacher, fail_first=1), stub(teacher), stub(teacher)
    ref = VLLMServerTeacher([good.url], 30, 0, len(tok), len(tok)).score(r, "sampled").logp_B_T
    good.seen.clear()
    got = VLLMServerTeacher([flaky.url], 30, 1, len(tok), len(tok)).score(r, "sampled").logp_B_T
    assert torch.equal(got, ref) and flaky.seen == [9]  # one 503, retried once
    pool = VLLMServerTeacher([dead.url, good.url], 30, 0, len(tok), len(tok))
    dead.dead = True  # dies after start-up
    assert torch.equal(pool.score(r, "sampled").logp_B_T, ref)
    assert dead.seen == [] and sorted(good.seen) == [4, 5]  # its own share and the dead one's
    good.dead = True
    with pytest.raises(RuntimeError, match="every teacher server failed"):
        pool.score(r, "sampled")


def test_a_bad_request_is_never_retried(pair, stub):
    _, teacher, _ = pair
    one = stub(teacher, fail_first=0)
    with pytest.raises(RuntimeError, match="HTTP 400"):
        request_json(one.url, "/v1/completions", {"prompt": [[1, 2]]}, 30, retries=5)
    assert one.seen == []


def test_a_request_one_replica_refuses_is_never_sent_to_the_others(pair, stub):
    from opd_exp.engines.rollout_vllm_server import BadRequest

    tok, teacher, r = pair
    refusing, good = stub(teacher), stub(teacher)
    pool = VLLMServerTeacher([refusing.url, good.url], 30, 3, len(tok), len(tok))
    refusing.bad = True
    with pytest.raises(BadRequest, match="HTTP 400"):
        pool.score(r, "sampled")
    # its own share at most (never the refused one's): a share whose worker thread had not yet
    # started when the refusal came is cancelled — seen under load, so both outcomes are right
    assert good.seen in ([], [5])


@pytest.mark.parametrize("code", [408, 429])
def test_a_gateway_timeout_or_too_many_requests_is_retried(pair, code, stub):
    tok, teacher, r = pair
    one = stub(teacher, fail_first=1, code=code)
    VLLMServerTeacher([one.url], 30, 1, len(tok), len(tok)).score(r, "sampled")
    assert one.seen == [9]


def test_a_short_answer_moves_on_to_the_next_replica(pair, stub):
    tok, teacher, r = pair
    short, good = stub(teacher), stub(teacher)
    ref = VLLMServerTeacher([good.url], 30, 0, len(tok), len(tok)).score(r, "sampled").logp_B_T
    good.seen.clear()
    short.short = True
    got = VLLMServerTeacher([short.url, good.url], 30, 0, len(tok), len(tok)).score(r, "sampled")
    assert torch.equal(got.logp_B_T, ref) and sorted(good.seen) == [4, 5]


def test_a_share_is_sent_as_requests_of_request_rows(pair, stub):
    tok, teacher, r = pair
    stubs = [stub(teacher), stub(teacher)]
    whole = VLLMServerTeacher([s.url for s in stubs], 30, 0, len(tok), len(tok)).score(r, "topk", K)
    split = VLLMServerTeacher([s.url for s in stubs], 30, 0, len(tok), len(tok), request_rows=2)
    got = split.score(r, "topk", K)
    assert torch.equal(got.topk_idx_B_T_K, whole.topk_idx_B_T_K)
    assert torch.equal(got.topk_logq_B_T_K, whole.topk_logq_B_T_K)
    assert [s.seen for s in stubs] == [[4, 2, 2], [5, 2, 2, 1]]
    for s in stubs:
        s.seen.clear()
    stubs[0].dead = True  # its share's requests go on at the other replica, tried once a share
    got = split.score(r, "topk", K)
    assert torch.equal(got.topk_idx_B_T_K, whole.topk_idx_B_T_K)
    assert stubs[0].failed == 1 and stubs[1].seen == [2, 2, 2, 2, 1]


def test_a_replica_serving_another_model_is_refused_at_start(pair, stub):
    from opd_exp.config import ConfigError

    tok, teacher, _ = pair
    one = stub(teacher)  # serves "teacher" from "/models/Teacher-8B"
    for same in ("/models/Teacher-8B", "org/teacher-8b", "teacher"):
        VLLMServerTeacher([one.url], 30, 0, len(tok), len(tok), expect=same)
    with pytest.raises(ConfigError, match=f"^teacher.server_urls: {one.url} serves 'teacher' "
                                          r"\(from '/models/Teacher-8B'\), not 'Qwen/Qwen3-8B'"):
        VLLMServerTeacher([one.url], 30, 0, len(tok), len(tok), expect="Qwen/Qwen3-8B")


def test_padded_rows_are_asked_for_only_where_they_crowd_the_top_k(pair, tiny_world, stub):
    """Qwen3's 267 padded rows would make every top-K request K + 267 entries a position: asked
    K + 8 first, and K + all padded only for rows where padded ids took the room of real ones
    (here: 13 loud padded rows that top every position, tests/test_vocab.py)."""
    from .test_vocab import EXTRA, _pad

    tok, teacher, r = pair
    V, extra = len(tok), EXTRA["teacher"]
    loud = _pad(AutoModelForCausalLM.from_pretrained(tiny_world / "teacher"), extra).eval()
    quiet, crowded = stub(teacher), stub(loud)  # quiet: no padded id is ever in the answer
    want = HFTeacher(teacher, 4, 7, vocab_size=V).score(r, "topk", K)
    got = VLLMServerTeacher([quiet.url], 30, 0, V, V + extra).score(r, "topk", K)
    assert quiet.asked == [K + 8] and torch.equal(got.topk_idx_B_T_K, want.topk_idx_B_T_K)
    want = HFTeacher(loud, 4, 7, vocab_size=V).score(r, "topk", K)
    got = VLLMServerTeacher([crowded.url], 30, 0, V, V + extra).score(r, "topk", K)
    # asked again: only the rows with a position where padded ids took a real one's room
    assert crowded.asked == [K + 8, K + extra] and crowded.seen[0] == 9 and 0 < crowded.seen[1] <= 9
    m = r.response_mask_B_T.bool()
    assert torch.equal(got.topk_idx_B_T_K[m], want.topk_idx_B_T_K[m])
    # the values: vLLM normalises over every row, the HF teacher over the real ones (loud
    # padding holds mass here, not in trained models): the same up to a shift per position
    shift = (got.topk_logq_B_T_K - want.topk_logq_B_T_K)[m]
    assert (shift - shift[:, :1]).abs().max() <= 1e-5 and int(got.topk_idx_B_T_K.max()) < V


def test_which_served_models_count_as_the_teacher():
    from opd_exp.engines.teacher_vllm_server import same_model

    snapshot = "/hf/models--Qwen--Qwen3-8B/snapshots/" + "a" * 40
    assert same_model(snapshot, "Qwen/Qwen3-8B", "Qwen/Qwen3-8B")  # the run reads the HF cache
    assert same_model("Qwen/Qwen3-8B", "teacher", "/data/Qwen3-8B")  # --served-model-name teacher
    assert same_model("/runs/a/final", "/runs/a/final", "/runs/a/final")
    assert not same_model("/runs/a/final", "/runs/b/final", "/runs/b/final")  # a stale teacher
    assert not same_model("Qwen/Qwen3-8B", "Qwen/Qwen3-1.7B", "Qwen/Qwen3-1.7B")


def test_the_secret_goes_with_every_request_and_a_refusal_is_one_line(pair, stub):
    from opd_exp.config import RunStopped

    tok, teacher, r = pair
    one = stub(teacher)
    one.token = "s3cret-" + "x" * 20
    with pytest.raises(RunStopped, match=r"HTTP 401: .* this run sent none; set serve.token_file") as e:
        VLLMServerTeacher([one.url], 30, 3, len(tok), len(tok))
    assert "\n" not in str(e.value) and one.auth == [None]  # refused once: never retried
    with pytest.raises(RunStopped, match="this run sent another"):
        VLLMServerTeacher([one.url], 30, 0, len(tok), len(tok), token="another-secret-0000")
    one.auth.clear()
    pool = VLLMServerTeacher([one.url], 30, 0, len(tok), len(tok), token=one.token, request_rows=4)
    pool.score(r, "sampled")
    assert one.auth == [f"Bearer {one.token}"] * 4 and one.seen == [4, 4, 1]  # models + 3 requests


def test_the_run_pushes_only_into_a_folder_serve_marked_each_push_a_folder_of_its_own(pair, stub, tiny_world,
                                                                                     tmp_path):
    from opd_exp.config import ConfigError, RunStopped
    from opd_exp.engines.rollout_vllm_server import SERVED_MARK, VLLMServerRollout

    tok, teacher, _ = pair
    student = AutoModelForCausalLM.from_pretrained(tiny_world / "student")
    one = stub(teacher)
    for root in ("/models/Teacher-8B", "Qwen/Qwen3-8B", str(tmp_path)):  # a user's own vLLM, a hub id
        one.root = root
        with pytest.raises(ConfigError, match=f"holds no {SERVED_MARK} here"):
            VLLMServerRollout(student, one.url, tok, {tok.eos_token_id}, 1)
    assert one.rpc == [] and list(tmp_path.iterdir()) == []  # nothing written, nothing reloaded
    (tmp_path / SERVED_MARK).write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"the served copy")
    sampler = VLLMServerRollout(student, one.url, tok, {tok.eos_token_id}, 1)
    first = sampler.weights_dir
    assert first.parent == tmp_path and (first / "model.safetensors").is_file()
    assert one.rpc == [("/collective_rpc", {"method": "reload_weights", "kwargs": {
        "weights_path": str(first), "is_checkpoint_format": True}}), ("/reset_prefix_cache", {})]
    sampler.sync_weights(student)
    assert sampler.weights_dir != first and not first.exists() and (sampler.weights_dir / "config.json").is_file()
    one.rpc_code = 403  # the server's guard refuses: the run stops in one line, its push removed
    with pytest.raises(RunStopped, match="HTTP 403"):
        sampler.sync_weights(student)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([SERVED_MARK, "model.safetensors",
                                                                 sampler.weights_dir.name])
    assert (tmp_path / "model.safetensors").read_bytes() == b"the served copy"  # never written over


def test_a_launched_run_is_refused_before_its_ranks_start(pair, stub, tmp_path, monkeypatch):
    from opd_exp.config import RunStopped
    from opd_exp.engines.rollout_vllm_server import check_access

    from .conftest import compose

    monkeypatch.delenv("OPD_EXP_SERVER_TOKEN_FILE", raising=False)
    _, teacher, _ = pair
    one = stub(teacher)
    one.token = "s3cret-" + "x" * 20
    secret = tmp_path / "token"
    secret.write_text(one.token)
    secret.chmod(0o600)
    args = ["teacher=vllm_server", f"teacher.server_urls=[{one.url}]"]
    with pytest.raises(RunStopped, match="HTTP 401"):
        check_access(compose(args))
    check_access(compose([*args, f"serve.token_file={secret}"]))
    check_access(compose(["teacher=vllm_server", "teacher.server_urls=[http://127.0.0.1:9]"]))  # not up yet


def test_the_servers_own_context_is_read_from_their_model_cards(stub):
    """A cross-tokenizer teacher cuts its rows to what the servers read (loop/build.py): the
    smallest max_model_len their /v1/models cards give; None where a card has none."""
    a, b = stub(None), stub(None)
    a.context, b.context = 300, 200
    assert VLLMServerTeacher([a.url, b.url], 5, 0, 10, 10).max_model_len == 200
    assert VLLMServerTeacher([stub(None).url], 5, 0, 10, 10).max_model_len is None
