"""EPI ranking the weights by an EMA of |g| instead of g**2: one large gradient counts less."""
from epi_mini.methods import EPIUpdate


class AbsGradEPI(EPIUpdate):
    label = "EPI on |g|"                       # its name in tables (default: the class name)

    def __init__(self, params, **options):    # built like --method epi, then the importance replaced
        super().__init__(params, **{**options, "importance": lambda param, grad: grad.abs()})
