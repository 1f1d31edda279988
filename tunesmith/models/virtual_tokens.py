"""Prefix and prompt tuning with outputs aligned to the input, as every tunesmith caller expects.

PEFT's own forward for these methods prepends the virtual tokens on every call: it returns logits for
the virtual positions too (prompt tuning) and replaces any KV cache passed in with a fresh prefix
(prefix tuning), so a cached decode loop would lose its history. `VirtualTokenModel` keeps PEFT's
parameters, saving, loading and `disable_adapter()`, and changes only the forward:

- the virtual tokens are added when the cache is empty (or absent), never again on later decode steps;
- the attention mask gains `num_virtual_tokens` leading ones and explicit position ids move right by as
  much, so real tokens sit where PEFT puts them;
- prompt tuning's logits for the virtual positions are cut off: logits[:, t] belongs to input token t.

Rows must be padded, one example per row (no packing): the prefix is attended by a whole row.
"""
from __future__ import annotations

from typing import Any

import torch
from peft import PeftModelForCausalLM
from peft.utils import PeftType

from tunesmith._core.errors import TunesmithError


class VirtualTokenModel(PeftModelForCausalLM):
    """A PEFT prefix- or prompt-tuning model whose forward lines up with its inputs (see the module doc)."""

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                past_key_values: Any = None, **kwargs: Any) -> Any:
        if any(k.startswith("cu_seq_lens") for k in kwargs):
            raise TunesmithError("prefix and prompt tuning need padded rows, not a flat variable-length batch")
        if kwargs.get("labels") is not None:
            raise TunesmithError("VirtualTokenModel computes no loss: pass no labels")
        config = self.active_peft_config
        n = config.num_virtual_tokens
        x = input_ids if input_ids is not None else inputs_embeds
        batch, length = x.shape[0], x.shape[1]
        first = past_key_values is None or past_key_values.get_seq_length() == 0
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(batch, n), attention_mask], dim=1)
        if position_ids is not None:
            position_ids = position_ids + n
        base = self.get_base_model()
        if config.peft_type == PeftType.PREFIX_TUNING:
            if first:
                past_key_values = self.get_prompt(batch, max_cache_len=length + n)
            return base(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                        position_ids=position_ids, past_key_values=past_key_values, **kwargs)
        assert config.peft_type == PeftType.PROMPT_TUNING, config.peft_type
        if not first:
            return base(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                        position_ids=position_ids, past_key_values=past_key_values, **kwargs)
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        prompts = self.get_prompt(batch_size=batch).to(inputs_embeds.dtype)
        if position_ids is not None:
            virtual = torch.arange(n, device=position_ids.device).expand(batch, n)
            position_ids = torch.cat([virtual, position_ids], dim=1)
        out = base(inputs_embeds=torch.cat([prompts, inputs_embeds], dim=1), attention_mask=attention_mask,
                   position_ids=position_ids, past_key_values=past_key_values, **kwargs)
        if out.logits.shape[1] == n + length:  # not when the caller kept only the last logits
            out.logits = out.logits[:, n:]
        return out


def align(model: PeftModelForCausalLM) -> VirtualTokenModel:
    """The same object, its forward aligned with its inputs. A class change rather than a wrapper keeps
    it a PeftModel for PEFT's save/load and for every `isinstance` check."""
    assert type(model) is PeftModelForCausalLM, type(model)
    assert model.active_peft_config.peft_type in (PeftType.PREFIX_TUNING, PeftType.PROMPT_TUNING)
    model.__class__ = VirtualTokenModel
    return model
