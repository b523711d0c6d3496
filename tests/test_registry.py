import pytest

import vtc
from vtc import Compressor, create_compressor, list_compressors


def test_builtin_compressors_registered():
    assert {"cls_attention", "fastervlm", "random", "pool"} <= set(list_compressors())


def test_unknown_compressor_lists_registry():
    with pytest.raises(ValueError, match="registered compressors: .*cls_attention"):
        create_compressor("nope")


def test_unknown_option_lists_valid_options():
    with pytest.raises(TypeError, match="valid options: \\['layers', 'start_layer'\\]"):
        create_compressor("cls_attention", strat_layer=3)


def test_non_string_name():
    with pytest.raises(TypeError):
        create_compressor(42)


def test_duplicate_registration_rejected():
    from dataclasses import dataclass

    @dataclass
    class Clash(Compressor):
        name = "random"

    with pytest.raises(ValueError, match="already registered"):
        vtc.register(Clash)


def test_bad_pool_mode():
    with pytest.raises(ValueError, match="'mean' or 'sample'"):
        create_compressor("pool", mode="max")
