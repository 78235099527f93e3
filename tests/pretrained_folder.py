"""Tiny CSM and Pocket TTS checkpoints saved to a folder the way their hub repositories lay them out, so that the
`weights: pretrained` path (from_pretrained, AutoProcessor, the tokenizer, the chat template) runs here without a
hub. The weights are the tiny test configs' (random: the audio is noise); the tokenizer is a real byte-level BPE
built with the `tokenizers` library, with the special tokens each processor reads at the ids each config names.
"""
from __future__ import annotations

import os

from lab.engines import csm, pocket_tts
from lab.engines import torch_common as tc
from lab.spec import VariantSpec

# What transformers reads from such a folder (model, processor, tokenizer), checked after saving.
CSM_FILES = {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "processor_config.json", "chat_template.jinja"}
POCKET_FILES = CSM_FILES | {"audio_tokenizer/config.json", "audio_tokenizer/model.safetensors"}

# sesame/csm-1b's template in short: each turn "[speaker]text" between the text BOS and EOS, then its audio.
CSM_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- bos_token -}}[{{ message['role'] }}]"
    "{%- for item in message['content'] -%}{%- if item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{{- eos_token -}}"
    "{%- for item in message['content'] -%}{%- if item['type'] == 'audio' -%}<|AUDIO|><|audio_eos|>{%- endif -%}"
    "{%- endfor -%}{%- endfor -%}")
# Pocket TTS: the text, then the first audio position (no voice prompt: the model's own voice).
POCKET_CHAT_TEMPLATE = (
    "{%- for message in messages -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}{%- endfor -%}{%- endfor -%}<|audio_bos|>")


def byte_tokenizer(specials: list[str], **named):
    """A real byte-level BPE tokenizer: ids 0-255 the bytes, then `specials` in order; wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    alphabet = ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda ch: _byte_of(ch))
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(byte_chars)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **named)


def _byte_of(ch: str) -> int:
    """The byte GPT-2's byte-level alphabet maps to `ch` (printable bytes map to themselves)."""
    code = ord(ch)
    if 33 <= code <= 126 or 161 <= code <= 172 or 174 <= code <= 255:
        return code
    skipped = [b for b in range(256) if not (33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255)]
    return skipped[code - 256]


def save_csm(folder: str) -> None:
    from transformers import CsmForConditionalGeneration, CsmProcessor, EncodecFeatureExtractor

    model = tc.init_random(CsmForConditionalGeneration, csm.tiny_config(),
                           VariantSpec(family="csm", name="csm-folder", weights="tiny"))
    model.save_pretrained(folder)
    config = model.config
    tokenizer = byte_tokenizer(["<|begin_of_text|>", "<|end_of_text|>", "<|AUDIO|>", "<|audio_eos|>"],
                               bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                               pad_token="<|end_of_text|>")
    assert tokenizer.convert_tokens_to_ids("<|begin_of_text|>") == config.bos_token_id
    assert tokenizer.convert_tokens_to_ids("<|AUDIO|>") == config.audio_token_id
    processor = CsmProcessor(EncodecFeatureExtractor(feature_size=1, sampling_rate=24000), tokenizer,
                             chat_template=CSM_CHAT_TEMPLATE)
    processor.save_pretrained(folder)
    _check(folder, CSM_FILES)


def save_pocket(folder: str) -> None:
    from transformers import (PocketTTSAudioTokenizerModel, PocketTTSFeatureExtractor,
                              PocketTTSForConditionalGeneration, PocketTTSProcessor)

    spec = VariantSpec(family="pocket_tts", name="pocket-folder", weights="tiny")
    model_config, codec_config = pocket_tts.tiny_config()
    model = tc.init_random(PocketTTSForConditionalGeneration, model_config, spec)
    model.save_pretrained(folder)
    codec_folder = os.path.join(folder, "audio_tokenizer")
    tc.init_random(PocketTTSAudioTokenizerModel, codec_config, spec, quantize=False).save_pretrained(codec_folder)
    codec = PocketTTSAudioTokenizerModel.from_pretrained(codec_folder)   # so the processor records where it lives
    c = model.config
    names = {"audio_prompt_token": "<|audio_prompt|>", "audio_latent_token": "<|audio_latent|>",
             "audio_prompt_bos_token": "<|audio_prompt_bos|>", "audio_bos_token": "<|audio_bos|>"}
    tokenizer = byte_tokenizer(list(names.values()), extra_special_tokens=names)
    for name, token_id in (("audio_prompt_token", c.audio_prompt_token_id), ("audio_bos_token", c.audio_bos_token_id),
                           ("audio_latent_token", c.audio_latent_token_id),
                           ("audio_prompt_bos_token", c.audio_prompt_bos_token_id)):
        assert tokenizer.convert_tokens_to_ids(names[name]) == token_id, name
    processor = PocketTTSProcessor(PocketTTSFeatureExtractor(), tokenizer, audio_tokenizer=codec,
                                   chat_template=POCKET_CHAT_TEMPLATE)
    processor.save_pretrained(folder)
    _check(folder, POCKET_FILES)


def _check(folder: str, expected: set[str]) -> None:
    have = {os.path.relpath(os.path.join(d, f), folder) for d, _, files in os.walk(folder) for f in files}
    missing = expected - have
    assert not missing, f"{folder}: transformers expects {sorted(missing)}; saved {sorted(have)}"
