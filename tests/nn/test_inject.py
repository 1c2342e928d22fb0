"""The module walker that swaps submodules (quantization, adapters)."""

import gc
import weakref

from torch import nn

from lmforge.nn.inject import replace_modules


def test_replaced_modules_are_freed_as_they_are_replaced():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4)))
    originals = {name: weakref.ref(module) for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    alive_when_built = {}

    def build(name, module):
        gc.collect()
        alive_when_built[name] = [other for other, ref in originals.items() if other != name and ref() is not None]
        return nn.Identity()

    replaced = replace_modules(model, lambda name, module: isinstance(module, nn.Linear), build)
    assert replaced == ["0", "2.0"]
    assert alive_when_built == {"0": ["2.0"], "2.0": []}  # the first Linear was gone before the second was built
    assert isinstance(model[0], nn.Identity) and isinstance(model[2][0], nn.Identity)
