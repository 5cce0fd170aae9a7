"""Build a tiny random Llama (fp32, head_dim 32) and a BPE tokenizer trained here, into argv[1]. Nothing is
downloaded. Run with the vLLM venv's python so the checkpoint matches the transformers vLLM loads it with."""
import sys

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = ("the quick brown fox jumps over a lazy dog while seven small robots count red blue green apples in "
         "a quiet garden near the river and every morning the old baker sells fresh bread to hungry travelers").split()


def corpus():
    for i in range(400):
        yield " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(12 + i % 9))


def main(out: str) -> None:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(out)
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1,
                      eos_token_id=2, tie_word_embeddings=False, torch_dtype="float32")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger logits spread than the default init, so greedy choices are not near-ties
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(out)


if __name__ == "__main__":
    main(sys.argv[1])
