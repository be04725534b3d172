"""On-policy distillation across tokenizers (docs/objectives.md, "Across tokenizers"): the maths.

The student p wrote a response in its tokens y_1..y_T; the teacher q reads the same bytes in its
own tokens z_1..z_U (under its own template). A **chunk** is a minimal pair of token runs, one
per side, that cover exactly the same bytes: chunk boundaries are the byte offsets where a
student token and a teacher token both end. Identical tokenizations give one token per side per
chunk. Over a chunk c (student tokens S_c, teacher tokens U_c, each a sum over its own tokens)

    log p(c) = Σ_{t∈S_c} log p(y_t | ·),   log q(c) = Σ_{u∈U_c} log q(z_u | ·),

both the probability of the same bytes given the same preceding bytes (each model's own prefix
tokenization). A sampled-token reward r_c = reward(log q(c), log p(c)) (log-ratio, PowerOPD's
power, clip / tanh / z-score: rewards.py) is then **credited** to the chunk's student tokens
(`xtok.credit`):
    last       r_c on the chunk's last student token, 0 on the others
    uniform    r_c / |S_c| on each
    surprisal  r_c · (−log p(y_t)) / Σ_{s∈S_c} (−log p(y_s))  (uniform where the sum is 0)
With one token per chunk each rule gives r_t = reward(log q(y_t), log p(y_t)): today's numbers.

The alignment reads each token's bytes only (O(T + U), no decoding of the student's tokens);
bytes that cannot be aligned (a truncated multi-byte character, tokens the teacher's template
adds) form no chunk: their student tokens get no signal and are counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd_exp.config.registry import XTOK_CREDITS as CREDITS


@dataclass(frozen=True)
class Chunk:
    s0: int  # student tokens [s0, s1)
    s1: int
    t0: int  # teacher tokens [t0, t1)
    t1: int


def align(student_lens: list[int], teacher_lens: list[int]) -> list[Chunk]:
    """The minimal chunks of two tokenizations of one byte string, given each token's byte
    length (the runs may differ in total: the longer one's tail after the last common offset
    forms no chunk). Two pointers over the cumulative offsets: the side that is behind advances;
    a chunk closes where both have advanced and their offsets meet. A zero-byte token joins the
    chunk that follows it (or none, at the end)."""
    chunks: list[Chunk] = []
    i = j = s0 = t0 = 0
    cs = ct = 0  # bytes covered by student tokens [0, i) and teacher tokens [0, j)
    while i < len(student_lens) or j < len(teacher_lens):
        if j >= len(teacher_lens) or (i < len(student_lens) and cs <= ct):
            cs += student_lens[i]
            i += 1
        else:
            ct += teacher_lens[j]
            j += 1
        if cs == ct and i > s0 and j > t0 and _nonempty(student_lens, s0, i):
            chunks.append(Chunk(s0, i, t0, j))
            s0, t0 = i, j
    return chunks


def _nonempty(lens: list[int], a: int, b: int) -> bool:
    return any(lens[k] for k in range(a, b))


def chunk_index(chunks: list[Chunk], T: int, side: str = "student") -> torch.Tensor:
    """[T] long: the chunk each token of one side belongs to, −1 where none."""
    out = torch.full((T,), -1, dtype=torch.long)
    for c, ch in enumerate(chunks):
        a, b = (ch.s0, ch.s1) if side == "student" else (ch.t0, ch.t1)
        out[a:min(b, T)] = c
    return out


def chunk_sums(x_B_T: torch.Tensor, chunk_B_T: torch.Tensor) -> torch.Tensor:
    """[B, C]: Σ of x over each chunk's tokens (C = the most chunks of a row; −1 tokens left out)."""
    C = int(chunk_B_T.max().item()) + 1 if chunk_B_T.numel() else 0
    out = x_B_T.new_zeros((x_B_T.shape[0], max(C, 1)))
    on = chunk_B_T >= 0
    return out.scatter_add_(1, chunk_B_T.clamp(min=0), torch.where(on, x_B_T, torch.zeros_like(x_B_T)))


def last_of_chunk(chunk_B_T: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: the last student token of each chunk."""
    nxt = torch.cat([chunk_B_T[:, 1:], torch.full_like(chunk_B_T[:, :1], -1)], 1)
    return (chunk_B_T >= 0) & (nxt != chunk_B_T)


def first_of_chunk(chunk_B_T: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: the first student token of each chunk (where both models predict the next
    bytes after the same byte prefix)."""
    prev = torch.cat([torch.full_like(chunk_B_T[:, :1], -1), chunk_B_T[:, :-1]], 1)
    return (chunk_B_T >= 0) & (prev != chunk_B_T)


def at_last(x_B_C: torch.Tensor, chunk_B_T: torch.Tensor) -> torch.Tensor:
    """[B, T]: each chunk's value on its last student token, 0 elsewhere."""
    return torch.where(last_of_chunk(chunk_B_T), x_B_C.gather(1, chunk_B_T.clamp(min=0)),
                       torch.zeros((), dtype=x_B_C.dtype, device=x_B_C.device))


def credit_weights(chunk_B_T: torch.Tensor, logp_B_T: torch.Tensor, credit: str) -> torch.Tensor:
    """[B, T]: the share of its chunk's reward each student token gets (Σ over a chunk = 1;
    0 on tokens in no chunk). `logp_B_T`: the student's log-probs (for `surprisal`)."""
    on = (chunk_B_T >= 0).to(logp_B_T.dtype)
    idx = chunk_B_T.clamp(min=0)
    if credit == "last":
        return last_of_chunk(chunk_B_T).to(logp_B_T.dtype)
    n_B_C = chunk_sums(on, chunk_B_T)
    uniform = on / n_B_C.gather(1, idx).clamp(min=1)
    if credit == "uniform":
        return uniform
    if credit == "surprisal":
        s_B_T = (-logp_B_T).clamp(min=0) * on
        tot = chunk_sums(s_B_T, chunk_B_T).gather(1, idx)
        return torch.where(tot > 0, s_B_T / tot.clamp(min=1e-30), uniform)
    raise ValueError(f"xtok.credit={credit!r}: one of {CREDITS}")


def chunk_rewards(reward_fn, logq_last_B_T: torch.Tensor, logp_B_T: torch.Tensor,
                  mask_B_T: torch.Tensor, chunk_B_T: torch.Tensor, credit: str):
    """Per-token rewards from chunk rewards: `reward_fn(logq, logp, mask) -> r` (a token reward of
    rewards.py) applied at each chunk's last student token to (log q(c), log p(c)), then credited.
    `logq_last_B_T` holds log q(c) on each chunk's last student token (TeacherScores.logp_B_T of a
    cross-tokenizer teacher). A chunk counts only if every one of its student tokens is in the
    mask (a masked special token takes its chunk out: log q(c) covers its bytes too).
    Returns (r_B_T, the chunk-level mask: 1 on the last tokens of the chunks that count)."""
    on = (chunk_B_T >= 0).to(mask_B_T.dtype)
    idx = chunk_B_T.clamp(min=0)
    whole_B_C = chunk_sums(on * mask_B_T, chunk_B_T) == chunk_sums(on, chunk_B_T)
    last_mask = last_of_chunk(chunk_B_T).to(mask_B_T.dtype) * whole_B_C.gather(1, idx).to(mask_B_T.dtype)
    logp_last = at_last(chunk_sums(logp_B_T, chunk_B_T), chunk_B_T)
    r_last = reward_fn(logq_last_B_T, logp_last, last_mask)
    w_B_T = credit_weights(chunk_B_T, logp_B_T, credit)
    r_chunk = chunk_sums(r_last, chunk_B_T).gather(1, idx)  # r_c on every token of chunk c
    return r_chunk * w_B_T * mask_B_T * on, last_mask


# ---- distribution-level objectives across tokenizers -------------------------------------------
#
# At the first token of each chunk both models predict the next bytes after the same byte prefix.
# The teacher's next-token distribution q(z) is carried onto the student's vocabulary by the
# byte-prefix map: each teacher token z goes to the longest student token whose bytes are a
# prefix of z's (its own bytes when the student has that token: exact matches first), so
# q̃(v) = Σ_{z → v} q(z) keeps which token is which and all the mass; a teacher token with no
# student prefix (a special token the student lacks) goes to the residual, reported, not trained.

def _first_ids(student_bytes: list[bytes]) -> dict[bytes, int]:
    """Each non-empty byte string's first student id."""
    first: dict[bytes, int] = {}
    for i, b in enumerate(student_bytes):
        if b:
            first.setdefault(b, i)
    return first


def prefix_map(student_bytes: list[bytes], teacher_bytes: list[bytes],
               student_special: set[int] = frozenset(), teacher_special: set[int] = frozenset()) -> torch.Tensor:
    """[V_teacher] long: the student token each teacher token's mass goes to (−1: residual).
    Special (added) tokens on either side match by exact bytes only: a teacher `<|im_end|>` the
    student lacks is residual, never the text token `<|`, and no text token lands on a student
    special token."""
    first = _first_ids([b"" if i in student_special else b for i, b in enumerate(student_bytes)])
    exact = _first_ids(student_bytes)
    longest = max((len(b) for b in first), default=0)
    out = torch.full((len(teacher_bytes),), -1, dtype=torch.long)
    for j, b in enumerate(teacher_bytes):
        if j in teacher_special:
            out[j] = exact.get(b, -1) if b else -1
            continue
        for n in range(min(len(b), longest), 0, -1):
            i = first.get(b[:n])
            if i is not None:
                out[j] = i
                break
    return out


def exact_map(student_bytes: list[bytes], teacher_bytes: list[bytes]) -> torch.Tensor:
    """[V_teacher] long: the student token with exactly the teacher token's bytes (−1: none)."""
    first = _first_ids(student_bytes)
    return torch.tensor([first.get(b, -1) if b else -1 for b in teacher_bytes], dtype=torch.long)


def mapped_logq(logq_N_Vt: torch.Tensor, src: torch.Tensor, dest: torch.Tensor,
                student_vocab: int) -> torch.Tensor:
    """The teacher's whole distribution carried onto the student's vocabulary by the byte-prefix
    map (teacher ids `src` → student ids `dest`, the mapped entries of `prefix_map`):
    log q̃(v) = log Σ_{z→v} q(z), a log-sum-exp per student id (the largest term factored out:
    a student id with one teacher token gets that token's log-prob exactly), −inf where no teacher
    token maps (outside the teacher's support). [..., V_t] → [..., V_s]; the residual's mass
    (unmapped teacher tokens) is left out, so Σ_v q̃(v) = 1 − residual."""
    vals = logq_N_Vt.index_select(-1, src)
    top = torch.full((*vals.shape[:-1], student_vocab), -torch.inf, dtype=vals.dtype, device=vals.device)
    top.scatter_reduce_(-1, dest.expand_as(vals), vals, "amax")  # an expanded view: no [N, V_t] index
    shift = top.index_select(-1, dest).nan_to_num_(neginf=0.0)  # all of a student id's terms −inf: no NaN
    mass = torch.zeros_like(top).index_add_(-1, dest, vals.sub_(shift).exp_())
    return mass.log_().add_(top)


def map_topk(logq_N_K: torch.Tensor, idx_N_K: torch.Tensor, to_student: torch.Tensor,
             rows: int = 4096):
    """The teacher's top-K (log-probs under its full softmax, its ids) at N positions carried onto
    the student's ids: (log q̃ [N, K] with merged duplicates in their first slot and −inf in the
    others and in unmapped slots, the student ids [N, K] (0 where −inf), residual mass [N]);
    `rows` positions at a time (the duplicate test holds [rows, K, K])."""
    if logq_N_K.shape[0] > rows:
        parts = [map_topk(logq_N_K[i:i + rows], idx_N_K[i:i + rows], to_student, rows)
                 for i in range(0, logq_N_K.shape[0], rows)]
        return tuple(torch.cat(x) for x in zip(*parts))
    sid = to_student[idx_N_K]
    ok = (sid >= 0) & torch.isfinite(logq_N_K)
    key = torch.where(ok, sid, -1 - torch.arange(sid.shape[1], device=sid.device).expand_as(sid))
    same = key[..., :, None] == key[..., None, :]  # [N, K, K]
    first = ~torch.tril(same, -1).any(-1)  # no equal key before it
    q = torch.where(ok, logq_N_K, torch.full_like(logq_N_K, -torch.inf))
    merged = torch.logsumexp(torch.where(same, q[..., None, :], torch.full_like(q[..., None, :], -torch.inf)), -1)
    keep = first & ok
    out = torch.where(keep, merged, torch.full_like(merged, -torch.inf))
    residual = torch.where(~ok & torch.isfinite(logq_N_K), logq_N_K.exp(), torch.zeros_like(logq_N_K)).sum(-1)
    return out, torch.where(keep, sid, torch.zeros_like(sid)), residual
