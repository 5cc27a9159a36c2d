"""BERT (encoder): the plain network, its pretraining heads and the Hugging Face mapping."""

from lm_lab.models.bert.heads import BertForPreTraining, BertOutput
from lm_lab.models.bert.model import Bert, BertConfig, EncoderOutput

__all__ = ["Bert", "BertConfig", "BertForPreTraining", "BertOutput", "EncoderOutput"]
