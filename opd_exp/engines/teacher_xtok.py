"""A teacher with another tokenizer (`pair.teacher` whose vocabulary differs from the student's):
the student's response, read as bytes, is tokenized by the teacher's tokenizer after the teacher's
own prompt, scored by the teacher's engine (HF, vLLM in process or on servers: any `Teacher`),
and its log-probs summed over the chunks that cover the same bytes (methods/xtok.py).

Per row: the student's response tokens up to its stop token; leading special tokens that the
teacher's own prompt already ends with (Qwen3.6's generation prompt opens `<think>`) are the
template's, not aligned; the rest becomes bytes (engines/token_bytes.py), its longest valid UTF-8
prefix the text the teacher's tokenizer reads. The student's stop token is paired with the
teacher's end token (its eos) as one more chunk, when every byte before it was aligned.
"""

from __future__ import annotations

import torch

from opd_exp.core.protocols import Teacher
from opd_exp.core.types import Rollouts, TeacherScores, left_pad, upcast
from opd_exp.engines.token_bytes import token_bytes
from opd_exp.methods.full_vocab import log_softmax_
from opd_exp.methods.xtok import (Chunk, align, at_last, chunk_index, chunk_sums, exact_map, map_topk,
                                  mapped_logq, prefix_map)


def valid_utf8_prefix(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        return data[:e.start].decode("utf-8")


def first_positions(chunks: list[list[Chunk]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, first student token, first teacher token) of every chunk: [N] long each."""
    b_N = torch.tensor([b for b, ch in enumerate(chunks) for _ in ch], dtype=torch.long)
    s_N = torch.tensor([c.s0 for ch in chunks for c in ch], dtype=torch.long)
    t_N = torch.tensor([c.t0 for ch in chunks for c in ch], dtype=torch.long)
    return b_N, s_N, t_N


class MappedHead(torch.nn.Module):
    """The teacher's LM head followed by its softmax over its tokens and the byte-prefix map onto
    the student's: h → log q̃ [..., V_student] (methods/xtok.py `mapped_logq`; −inf where no
    teacher token maps). What a full-vocabulary objective reads as the teacher's logits across
    tokenizers; the residual (teacher tokens with no student prefix) is left out."""

    def __init__(self, head: torch.nn.Module, to_student: torch.Tensor, student_vocab: int):
        super().__init__()
        self.head, self.teacher_vocab, self.student_vocab = head, len(to_student), student_vocab
        src = (to_student >= 0).nonzero()[:, 0]
        self.register_buffer("src", src, persistent=False)
        self.register_buffer("dest", to_student[src], persistent=False)
        self.register_buffer("lost", (to_student < 0).nonzero()[:, 0], persistent=False)  # the residual

    def teacher_logq(self, h: torch.Tensor) -> torch.Tensor:
        return log_softmax_(upcast(self.head(h)[..., :self.teacher_vocab]))  # fresh: in place

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return mapped_logq(self.teacher_logq(h), self.src, self.dest, self.student_vocab)


class XTokTeacher:
    """`inner` scores sequences in the teacher's tokens (built with the teacher's tokenizer); the
    rollouts given to `score` carry the teacher's prompt ids (pair.teacher_prompt=own) and the
    student's response ids."""

    def __init__(self, inner: Teacher, student_tok, teacher_tok, student_stop_ids: set[int],
                 credit: str = "last", loss: str = "lsm", max_len: int | None = None):
        self.inner, self.teacher_tok, self.credit, self.loss = inner, teacher_tok, credit, loss
        self.max_len = max_len  # the most prompt + response tokens the teacher's engine reads
        self.s_bytes, self.t_bytes = token_bytes(student_tok), token_bytes(teacher_tok)
        self.t_special = set(teacher_tok.added_tokens_decoder)
        self.stop_ids = set(student_stop_ids)
        self.t_eos, self.t_pad = teacher_tok.eos_token_id, teacher_tok.pad_token_id
        self.to_student = prefix_map(self.s_bytes, self.t_bytes, set(student_tok.added_tokens_decoder),
                                     self.t_special)  # distributions: teacher id → student id
        s_eos = student_tok.eos_token_id
        if self.t_eos is not None and s_eos in self.stop_ids:  # the end chunk pairs them (align_row)
            self.to_student[self.t_eos] = s_eos
        self.exact = exact_map(self.s_bytes, self.t_bytes)  # xtok.loss=uld_hybrid's matched entries
        self._mapped: MappedHead | None = None  # objective=full_vocab's teacher head (_mapped_head)

    def _length(self, ids: list[int], mask: list[float]) -> int:
        """Tokens of the response: up to its last trained token, and the stop token right after it
        where that one was masked (objective.mask_stop_token); never the padding after a stop
        (a pad id may be a stop id: Qwen's <|endoftext|>)."""
        n = max((t + 1 for t, m in enumerate(mask) if m > 0), default=0)
        ended = n > 0 and ids[n - 1] in self.stop_ids
        return n + 1 if not ended and n < len(ids) and ids[n] in self.stop_ids else n

    def _template_tokens(self, prompt_ids: list[int], body: list[int]) -> int:
        """How many leading student tokens spell what the teacher's prompt already ends with: from
        its last special token to its end (Qwen3.6's template opens `<think>\n`; the student writes
        it as `<think>` `\n`, or Qwen2.5 `<th` `ink` `>\n`, or without the newline). A student token
        that runs past that tail is left out too (its extra bytes reach neither side)."""
        at = next((k for k in range(len(prompt_ids) - 1, -1, -1) if prompt_ids[k] in self.t_special
                   and self.t_bytes[prompt_ids[k]].strip()), None)
        if at is None or any(self.t_bytes[i].strip() for i in prompt_ids[at + 1:]):
            return 0
        special = self.t_bytes[prompt_ids[at]]
        want = b"".join(self.t_bytes[i] for i in prompt_ids[at:])
        got, best = b"", 0
        for k, i in enumerate(body):
            got += self.s_bytes[i] if i < len(self.s_bytes) else b""
            g = got.lstrip()
            if g == want:
                return k + 1
            if want.startswith(g):
                best = k + 1 if len(g) >= len(special) else best
            elif g.startswith(want):
                return k + 1
            else:
                break
        return best

    def align_row(self, prompt_ids: list[int], ids: list[int]) -> tuple[list[int], list[Chunk]]:
        """(the teacher's response ids, the chunks) of one student response `ids`."""
        stop = bool(ids) and ids[-1] in self.stop_ids
        body = ids[:-1] if stop else ids
        skip = self._template_tokens(prompt_ids, body)
        s_pieces = [self.s_bytes[i] if i < len(self.s_bytes) else b"" for i in body[skip:]]
        data = b"".join(s_pieces)
        text = valid_utf8_prefix(data)
        t_ids = self.teacher_tok(text, add_special_tokens=False).input_ids if text else []
        t_lens = [len(self.t_bytes[i]) for i in t_ids]
        spelled = b"".join(self.t_bytes[i] for i in t_ids)
        extra = len(spelled) - len(text.encode())
        if extra > 0 and t_lens and t_lens[0] >= extra and spelled[:extra].isspace() \
                and spelled[extra:] == text.encode():  # SentencePiece's dummy prefix space
            t_lens[0] -= extra  # (the text the teacher reads has no such space: it is its own)
        elif spelled != text.encode():  # the teacher's tokenizer changed the text
            return [], []
        chunks = [Chunk(c.s0 + skip, c.s1 + skip, c.t0, c.t1) for c in align(
            [len(p) for p in s_pieces], t_lens)]
        whole = len(text.encode()) == len(data) and (not chunks or chunks[-1].s1 == len(body))
        if stop and whole and self.t_eos is not None:
            chunks.append(Chunk(len(body), len(body) + 1, len(t_ids), len(t_ids) + 1))
            t_ids = t_ids + [self.t_eos]
        return t_ids, chunks

    def fit(self, prompt_len: int, t_ids: list[int], chunks: list[Chunk]) -> tuple[list[int], list[Chunk]]:
        """The teacher's tokens cut to its engine's context (its tokenizer may spell the response in
        more tokens than the student's, which the prompt pool's length check counts); the chunks
        past the cut get no signal (xtok/aligned_share counts them)."""
        room = len(t_ids) if self.max_len is None else max(0, self.max_len - prompt_len)
        if len(t_ids) <= room:
            return t_ids, chunks
        return t_ids[:room], [c for c in chunks if c.t1 <= room]

    @torch.no_grad()
    def score(self, rollouts: Rollouts, needs: str, k: int = 0) -> TeacherScores:
        """"sampled": log q(chunk) on each chunk's last student token; "topk": the teacher's
        top-K at each chunk's first token, on the student's ids (methods/xtok.py map_topk)."""
        if needs == "none":
            return TeacherScores()
        if needs not in ("sampled", "topk", "hidden"):
            raise ValueError(f"a teacher with another tokenizer scores chunk log-probs ('sampled'), "
                             f"its top-K ('topk') or its hidden states ('hidden'), not {needs!r}")
        B, T = rollouts.response_ids_B_T.shape
        prompts = [[i for i, m in zip(p, pm) if m] for p, pm in
                   zip(rollouts.prompt_ids_B_P.tolist(), rollouts.prompt_mask_B_P.tolist())]
        resp, masks = rollouts.response_ids_B_T.tolist(), rollouts.response_mask_B_T.tolist()
        rows, chunks, cut = [], [], 0
        lengths = [self._length(r, m) for r, m in zip(resp, masks)]
        for b in range(B):
            t_ids, ch = self.align_row(prompts[b], resp[b][:lengths[b]])
            fitted = self.fit(len(prompts[b]), t_ids, ch)
            cut += len(fitted[0]) < len(t_ids)
            rows.append(fitted[0])
            chunks.append(fitted[1])
        U = max(1, max(len(r) for r in rows))
        t_resp = torch.full((B, U), self.t_pad, dtype=torch.long)
        t_mask = torch.zeros(B, U)
        for b, r in enumerate(rows):
            t_resp[b, :len(r)] = torch.tensor(r, dtype=torch.long)
            t_mask[b, :len(r)] = 1.0
        p_ids, p_mask = left_pad(prompts, self.t_pad)
        dev = rollouts.response_ids_B_T.device
        t_roll = Rollouts(p_ids.to(dev), p_mask.to(dev), t_resp.to(dev), t_mask.to(dev), rollouts.group_B)
        metrics = {**self.metrics(chunks, lengths), "xtok/cut_rows": float(cut)}
        if needs == "hidden":
            return self._hidden(self.inner.score(t_roll, "hidden"), chunks, T, dev, metrics)
        if needs == "topk":
            return self._topk(self.inner.score(t_roll, "topk", k), chunks, B, T, dev, metrics)
        logq_B_U = self.inner.score(t_roll, "sampled").logp_B_T.to(dev) * t_mask.to(dev)
        s_chunk = torch.stack([chunk_index(c, T) for c in chunks]).to(dev)
        t_chunk = torch.stack([chunk_index(c, U, "teacher") for c in chunks]).to(dev)
        logq_B_C = chunk_sums(logq_B_U, t_chunk)
        C = int(s_chunk.max()) + 1
        if logq_B_C.shape[1] < C:
            logq_B_C = torch.nn.functional.pad(logq_B_C, (0, C - logq_B_C.shape[1]))
        return TeacherScores(logp_B_T=at_last(logq_B_C, s_chunk), chunk_B_T=s_chunk,
                             credit=self.credit, metrics=metrics)

    def _mapped_head(self, lm_head: torch.nn.Module, device) -> MappedHead:
        """One `MappedHead` per teacher head and device, its index buffers made once, not every step."""
        if self._mapped is None or self._mapped.head is not lm_head or self._mapped.src.device != device:
            self._mapped = MappedHead(lm_head, self.to_student, len(self.s_bytes)).to(device)
        return self._mapped

    def _hidden(self, t: TeacherScores, chunks: list[list[Chunk]], T: int, dev, metrics: dict,
                rows: int = 256) -> TeacherScores:
        """The teacher's final hidden state at each chunk's first teacher token, put at the chunk's
        first student token, with a head that maps its softmax onto the student's ids
        (`MappedHead`); the objective trains those positions only (`chunk_B_T`). Mapped and
        residual mass measured here, `rows` positions at a time."""
        B = len(chunks)
        hidden = t.hidden_B_T_H.new_zeros((B, T, t.hidden_B_T_H.shape[-1]))
        b_N, s_N, t_N = first_positions(chunks)
        head = self._mapped_head(t.lm_head, t.hidden_B_T_H.device)
        metrics["xtok/mapped_mass"] = metrics["xtok/residual_mass"] = float("nan")
        if len(b_N):
            h_N_H = t.hidden_B_T_H[b_N.to(t.hidden_B_T_H.device), t_N.to(t.hidden_B_T_H.device)]
            hidden[b_N.to(hidden.device), s_N.to(hidden.device)] = h_N_H
            residual = torch.cat([head.teacher_logq(h_N_H[i:i + rows]).index_select(-1, head.lost).exp().sum(-1)
                                  for i in range(0, len(b_N), rows)])
            metrics["xtok/mapped_mass"] = float(1 - residual.mean())
            metrics["xtok/residual_mass"] = float(residual.mean())
        s_chunk = torch.stack([chunk_index(c, T) for c in chunks])
        return TeacherScores(hidden_B_T_H=hidden.to(dev), lm_head=head, chunk_B_T=s_chunk.to(dev),
                             metrics=metrics)

    def _topk(self, t: TeacherScores, chunks: list[list[Chunk]], B: int, T: int, dev,
              metrics: dict) -> TeacherScores:
        """The teacher's top-K at each chunk's first teacher token, carried onto the student's
        ids at the chunk's first student token; every other position has an empty support."""
        K = t.topk_logq_B_T_K.shape[-1]
        b_N, s_N, t_N = first_positions(chunks)
        logq = torch.full((B, T, K), -torch.inf, device=dev, dtype=t.topk_logq_B_T_K.dtype)
        idx = torch.zeros((B, T, K), dtype=torch.long, device=dev)
        metrics["xtok/mapped_mass"] = metrics["xtok/residual_mass"] = float("nan")  # same keys on every rank
        if len(b_N):
            lq, sid, residual = map_topk(t.topk_logq_B_T_K[b_N, t_N].cpu(), t.topk_idx_B_T_K[b_N, t_N].cpu(),
                                         self.to_student)
            logq[b_N, s_N], idx[b_N, s_N] = lq.to(dev, logq.dtype), sid.to(dev)
            metrics["xtok/mapped_mass"] = float(torch.where(torch.isfinite(lq), lq.exp(), 0).sum(-1).mean())
            metrics["xtok/residual_mass"] = float(residual.mean())
        if self.loss == "lsm":
            return TeacherScores(topk_logq_B_T_K=logq, topk_idx_B_T_K=idx, metrics=metrics)
        raw = torch.full_like(logq, -torch.inf)  # the ULD ablations: the teacher's own top-K
        exact = torch.full_like(idx, -1)
        if len(b_N):
            raw[b_N, s_N] = t.topk_logq_B_T_K[b_N, t_N].to(dev, raw.dtype)
            exact[b_N, s_N] = self.exact[t.topk_idx_B_T_K[b_N, t_N].cpu()].to(dev)
        return TeacherScores(topk_logq_B_T_K=raw, topk_idx_B_T_K=idx, topk_exact_B_T_K=exact,
                             xtok_loss=self.loss, metrics=metrics)

    def metrics(self, chunks: list[list[Chunk]], lengths: list[int]) -> dict[str, float]:
        """xtok/* (docs/metrics.md) over the step's responses (`lengths`: their tokens)."""
        tokens = sum(lengths)
        all_ch = [c for ch in chunks for c in ch]
        aligned = sum(c.s1 - c.s0 for c in all_ch)
        n = len(all_ch) or float("nan")  # no chunk on this rank: left out of the mean over ranks
        lens = [c.s1 - c.s0 for c in all_ch]
        return {"xtok/aligned_share": aligned / tokens if tokens else float("nan"),
                "xtok/one_to_one_share": sum(c.s1 - c.s0 == 1 and c.t1 - c.t0 == 1 for c in all_ch) / n,
                "xtok/chunk_student_tokens": aligned / n,
                "xtok/chunk_teacher_tokens": sum(c.t1 - c.t0 for c in all_ch) / n,
                "xtok/chunk_len_1_share": sum(x == 1 for x in lens) / n,
                "xtok/chunk_len_2_share": sum(x == 2 for x in lens) / n,
                "xtok/chunk_len_3plus_share": sum(x >= 3 for x in lens) / n,
                "xtok/unaligned_rows": float(sum(not ch for ch, n in zip(chunks, lengths) if n))}
