"""Teacher sampling (`specialize teacher generate|filter`): CoT samples with top-k logprobs from an
OpenAI-compatible server or a local transformers model, resumable, then filtered by correctness."""
from .backends import Completion, MalformedResponse, Sample, TeacherBackendError, TransientError
from .filter import filter_samples
from .generate import build_prompts, generate, make_backend
from .records import ResumeError, iter_records


def __getattr__(name):  # the backends import torch / openai only when asked for
    if name == "HFBackend":
        from .hf_backend import HFBackend
        return HFBackend
    if name == "OpenAIBackend":
        from .openai_backend import OpenAIBackend
        return OpenAIBackend
    raise AttributeError(name)


__all__ = ["generate", "filter_samples", "make_backend", "build_prompts", "HFBackend", "OpenAIBackend", "Sample",
           "Completion", "TransientError", "MalformedResponse", "TeacherBackendError", "ResumeError", "iter_records"]
