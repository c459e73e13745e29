"""A text champion as MLflow serves it: `predict(["some text", ...])` returns the predicted class names.

This file is the model's code (MLflow's models-from-code: logged as a file beside the model and run when it is loaded,
never unpickled), so it imports nothing of fine_tune. Its artifacts: the encoder and head as an exported program
(`torch.export`: token ids and mask in, logits out), the tokenizer's own files, and the class names with the token
count the texts are padded to.
"""
import json
from pathlib import Path

import mlflow
import torch


class TextClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(context.artifacts["tokenizer"])
        self.program = torch.export.load(context.artifacts["program"]).module()
        labels = json.loads(Path(context.artifacts["labels"]).read_text())
        self.classes, self.max_length = labels["class_names"], labels["max_length"]

    def predict(self, context, model_input, params=None):
        """Texts (a list, a Series, or a DataFrame's first column) -> their predicted class names."""
        texts = model_input.iloc[:, 0] if hasattr(model_input, "columns") else model_input
        enc = self.tokenizer([str(t) for t in texts], truncation=True, max_length=self.max_length,
                             padding="max_length", return_tensors="pt")
        with torch.no_grad():
            logits = self.program(torch.stack([enc["input_ids"], enc["attention_mask"]], dim=1).long())
        return [self.classes[i] for i in logits.argmax(1).tolist()]


# MLflow's models-from-code: the model object this file defines, found when MLflow loads it.
mlflow.models.set_model(TextClassifier())
