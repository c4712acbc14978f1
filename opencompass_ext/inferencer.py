"""An OpenCompass PPL inferencer that scores all the choices of an item together.

OpenCompass's ``PPLInferencer`` scores label by label: all items for choice A, then all for
choice B, ..., so an item's shared prompt (and, in few-shot sets, the in-context examples
shared by every item) is run once per choice. ``PrefixSharingPPLInferencer`` builds the same
prompts, hands each item's choices to the model's ``get_ppl_grouped`` (PcaLlamaBaseModel:
shared prefixes run once, see scoring.py) and writes the same prediction file. The scores
are get_ppl's numbers, so predictions match the label-by-label run up to float rounding.

Models without ``get_ppl_grouped``, and the normalizing_str variant, use PPLInferencer's own
loop unchanged.
"""
from __future__ import annotations

import os

from opencompass.openicl.icl_inferencer import PPLInferencer
from opencompass.openicl.icl_inferencer.icl_base_inferencer import PPLInferencerOutputHandler
from opencompass.registry import ICL_INFERENCERS

__all__ = ["PrefixSharingPPLInferencer"]


@ICL_INFERENCERS.register_module(name="PrefixSharingPPLInferencer", force=True)
class PrefixSharingPPLInferencer(PPLInferencer):
    def inference(self, retriever, ice_template=None, prompt_template=None, output_json_filepath=None,
                  output_json_filename=None, normalizing_str=None) -> list:
        if normalizing_str is not None or not hasattr(self.model, "get_ppl_grouped"):
            return super().inference(retriever, ice_template=ice_template, prompt_template=prompt_template,
                                     output_json_filepath=output_json_filepath,
                                     output_json_filename=output_json_filename, normalizing_str=normalizing_str)
        out_dir = output_json_filepath or self.output_json_filepath
        out_name = output_json_filename or self.output_json_filename
        handler = PPLInferencerOutputHandler()
        ice_ids = retriever.retrieve()
        labels = self.labels or retriever.get_labels(ice_template=ice_template, prompt_template=prompt_template)
        ice = [retriever.generate_ice(ids, ice_template=ice_template) for ids in ice_ids]

        texts = [[self.model.parse_template(
                      self._label_prompt(retriever, idx, ice, ice_ids, label, ice_template, prompt_template), mode="ppl")
                  for label in labels] for idx in range(len(ice_ids))]  # per item, one prompt per label
        handler.save_ice(self.model.parse_template(ice, mode="ppl"))  # after any shortening of the examples
        scores = self.model.get_ppl_grouped(texts)

        for idx, (item, item_scores) in enumerate(zip(texts, scores)):
            ice_text = self.model.parse_template(ice[idx], mode="ppl")
            for label, prompt, score in zip(labels, item, item_scores):
                handler.save_prompt_and_ppl(label, prompt.replace(ice_text, ""), prompt, score, idx)
        predictions = [labels[min(range(len(labels)), key=s.__getitem__)] for s in scores]
        handler.save_predictions(predictions)
        reader = retriever.dataset_reader
        if reader.output_column:
            handler.save_golds(reader.dataset["test"][reader.output_column])
        if self.is_main_process:
            os.makedirs(out_dir, exist_ok=True)
            handler.write_to_json(out_dir, out_name)
        return predictions

    def _label_prompt(self, retriever, idx, ice, ice_ids, label, ice_template, prompt_template):
        """The prompt of one (item, label); in-context examples dropped from the end while it is too long."""
        def build():
            return retriever.generate_label_prompt(idx, ice[idx], label, ice_template=ice_template,
                                                   prompt_template=prompt_template)
        prompt = build()
        if self.max_seq_len is not None:
            while ice_ids[idx] and self.model.get_token_len_from_template(prompt, mode="ppl") > self.max_seq_len:
                ice_ids[idx] = ice_ids[idx][:-1]
                ice[idx] = retriever.generate_ice(ice_ids[idx], ice_template=ice_template)
                prompt = build()
        return prompt
