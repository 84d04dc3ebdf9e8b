"""The draft family table (convert/families.py), the format registry (convert/formats/) and rule tables that carry
their own template names (convert/names.py)."""

from dspark_jax.convert import formats
from dspark_jax.convert.families import BLOCK, EAGLE3, FAMILIES
from dspark_jax.convert.names import CHOICES, DEEPSPEC_DSPARK_RULES, DEEPSPEC_EAGLE3_RULES, KeyRule, with_choices
from dspark_jax.drafts import config as dcfg


def test_every_draft_architecture_has_one_family():
    assert set(FAMILIES) == set(dcfg.ARCHITECTURES)
    for arch, family in FAMILIES.items():
        assert family.architecture == arch
        assert family.kind is (EAGLE3 if arch in (dcfg.EAGLE3_ARCH, dcfg.GEMMA4_EAGLE3_ARCH) else BLOCK)
        assert (family.deepspec_only is None) == (arch not in dcfg.GEMMA4_ARCHITECTURES)


def test_registry_holds_every_format_once():
    assert tuple(formats.REGISTRY) == formats.FORMATS
    assert all(f.name == name for name, f in formats.REGISTRY.items())


def test_a_table_carries_its_own_template_names():
    rule = with_choices((KeyRule("a.{own}.weight", "a.{own}.kernel", "transpose"),), {"own": "x|y"})[0]
    assert "own" not in CHOICES
    assert rule.torch_regex().match("a.y.weight").group("own") == "y"
    assert not rule.nnx_regex().match("a.z.kernel")
    # the draft tables' head and Eagle3 norm names travel with their rules, not through CHOICES
    assert not {"markov_w", "markov_proj", "eagle_norm"} & set(CHOICES)
    keys = ("markov_head.markov_w2.weight", "markov_head.joint_proj.bias")
    assert all(any(r.torch_regex().match(k) for r in DEEPSPEC_DSPARK_RULES) for k in keys)
    assert any(r.torch_regex().match("layers.0.hidden_norm.weight") for r in DEEPSPEC_EAGLE3_RULES)
