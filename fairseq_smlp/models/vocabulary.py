"""A checkpoint evaluated on a data-bin with another dictionary fails with a bare size-mismatch
error from torch; say which dictionaries disagree and how to fix it instead."""


def check_vocabulary(model, state_dict) -> None:
    saved = state_dict.get("decoder.embed_tokens.weight")
    mine = model.decoder.embed_tokens.weight
    if saved is not None and saved.size(0) != mine.size(0):
        dict_file = getattr(model, "dictionary_file", None) or "the data-bin's dict.txt"
        raise ValueError(
            f"dictionary mismatch: the checkpoint was trained with a {saved.size(0)}-symbol dictionary, but "
            f"{dict_file} has {mine.size(0)} symbols. Evaluate with the data-bin the model was trained on, or "
            "binarize your text with that dictionary (fairseq-preprocess --only-source --srcdict TRAINED/dict.txt)"
        )


class VocabularyCheck:
    """Mixin for a FairseqLanguageModel: check the dictionary before loading a state dict."""

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        check_vocabulary(self, state_dict)
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)
