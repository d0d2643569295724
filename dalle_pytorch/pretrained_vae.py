"""Released image tokenizers: OpenAI's dVAE and taming VQGANs (stub, being written)."""


class OpenAIDiscreteVAE:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("OpenAIDiscreteVAE is being written")


class VQGanVAE:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("VQGanVAE is being written")
