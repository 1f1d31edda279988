"""The reward head scores each sequence at its real last token, however it is batched."""
import torch

from tunesmith.data.conversation import Conversation, Message
from tunesmith.data.packing import Example, collate, shift_labels
from tunesmith.data.render import tokenize_conversation
from tunesmith.models.reward import sequence_scores, to_reward_model


def example(tokenizer, user, answer):
    return shift_labels(*tokenize_conversation(
        tokenizer, Conversation(messages=(Message("user", user), Message("assistant", answer)))))


def test_body_is_copied_and_head_is_small(tokenizer, tiny):
    rm = to_reward_model(tiny)
    for (name, a), (_, b) in zip(tiny.model.named_parameters(), rm.model.named_parameters()):
        assert torch.equal(a, b), name
    assert rm.score.weight.shape == (1, tiny.config.hidden_size)
    assert rm.score.weight.std() < 0.3


def test_score_is_read_at_the_last_token_even_when_pad_equals_eos(tokenizer, tiny):
    rm = to_reward_model(tiny).eval()
    full = example(tokenizer, "Is 7 > 3?", "Yes")
    ex = Example(full.input_ids[:-1], full.targets[:-1])  # drop the template's trailing newline: ends on <|im_end|>
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == ex.input_ids[-1]
    batch = collate([[ex]], pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        ours = sequence_scores(rm, batch)
        hidden = rm.model(input_ids=batch["input_ids"]).last_hidden_state
        by_hand = rm.score(hidden[0, len(ex) - 1]).squeeze()
        hf = rm(input_ids=batch["input_ids"]).logits.squeeze()
    assert torch.allclose(ours[0], by_hand, atol=1e-6)
    # transformers reads the rightmost token that is not the pad token: with pad == eos, one token early.
    assert not torch.allclose(hf, by_hand, atol=1e-4)


def test_scores_do_not_depend_on_padding_or_packing(tokenizer, tiny):
    rm = to_reward_model(tiny).eval()
    exs = [example(tokenizer, "q", "a short answer"), example(tokenizer, "another question", "x"),
           example(tokenizer, "third", "a much longer answer than the others")]
    with torch.no_grad():
        alone = torch.cat([sequence_scores(rm, collate([[e]], 2)) for e in exs])
        padded = sequence_scores(rm, collate([[e] for e in exs], 2))
        packed = sequence_scores(rm, collate([exs], 2))
    assert torch.allclose(padded, alone, atol=1e-5) and torch.allclose(packed, alone, atol=1e-5)


def test_lora_reward_model_trains_body_adapters_and_head(tokenizer, tiny):
    from peft import LoraConfig, get_peft_model

    rm = get_peft_model(to_reward_model(tiny), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                          task_type="SEQ_CLS"))
    chosen, rejected = example(tokenizer, "q", "good"), example(tokenizer, "q", "bad")
    scores = sequence_scores(rm, collate([[chosen], [rejected]], 2))
    torch.nn.functional.softplus(-(scores[0] - scores[1])).backward()  # Bradley-Terry
    with_grad = {n for n, p in rm.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("score" in n for n in with_grad) and any("lora_" in n for n in with_grad)
    assert all(("lora_" in n or "score" in n) for n, p in rm.named_parameters() if p.requires_grad)


def test_a_ranking_scores_each_answer_once_and_every_pair_gets_its_sides_scores(tokenizer, tiny):
    """A 3-way ranking is 3 pairs over 3 distinct answers: the batch holds 3 rows, and `score_pairs` gives
    each pair the scores of its own two answers, as scoring every side alone does."""
    from tunesmith.data.preference import PairExample, collate_pairs
    from tunesmith.eval.preference import score_pairs

    rm = to_reward_model(tiny).eval()
    a, b, c = (example(tokenizer, "which?", answer) for answer in ("first", "second one", "third answer here"))
    ranking = [PairExample(a, b, None, 0), PairExample(a, c, None, 0), PairExample(b, c, None, 0)]
    assert collate_pairs([ranking], 2)["input_ids"].shape[0] == 3
    chosen, rejected = score_pairs(rm, [ranking], 2)
    with torch.no_grad():
        alone = {ex: sequence_scores(rm, collate([[ex]], 2))[0] for ex in (a, b, c)}
    torch.testing.assert_close(chosen, torch.stack([alone[a], alone[a], alone[b]]), atol=1e-5, rtol=0)
    torch.testing.assert_close(rejected, torch.stack([alone[b], alone[c], alone[c]]), atol=1e-5, rtol=0)
