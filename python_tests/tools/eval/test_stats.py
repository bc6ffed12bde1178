"""dpe_kernels.tools.eval.stats: the Student-t quantile and intervals (no SciPy needed)."""
import math

import pytest

from dpe_kernels.tools.eval.stats import mean_se, paired_gain, t_interval, t_quantile

# t_{0.975, df} from published tables
TABLE = {1: 12.706, 2: 4.303, 4: 2.776, 9: 2.262, 19: 2.093, 30: 2.042, 120: 1.980}


@pytest.mark.parametrize("df,want", sorted(TABLE.items()))
def test_t_quantile_table(df, want):
    assert t_quantile(0.975, df) == pytest.approx(want, abs=6e-4)
    assert t_quantile(0.025, df) == pytest.approx(-want, abs=6e-4)


def test_t_quantile_against_scipy():
    st = pytest.importorskip("scipy.stats")
    for df in (1, 3, 7, 19, 50, 1000):
        for p in (0.6, 0.9, 0.975, 0.995):
            assert t_quantile(p, df) == pytest.approx(float(st.t.ppf(p, df)), rel=1e-9, abs=1e-9)
    assert t_quantile(0.975, 1e6) == pytest.approx(1.959964, abs=1e-5)  # the normal limit


def test_interval_and_paired_gain():
    iv = t_interval([1.0, 2.0, 3.0, 4.0])
    half = t_quantile(0.975, 3) * math.sqrt(5 / 3) / 2  # sd = sqrt(5/3), se = sd / sqrt(4)
    assert iv.mean == 2.5 and iv.n == 4
    assert iv.low == pytest.approx(2.5 - half) and iv.high == pytest.approx(2.5 + half)
    one = t_interval([7.0])
    assert one.mean == 7.0 and math.isnan(one.low) and math.isnan(one.high)
    assert mean_se([2.0, 2.0, 2.0]) == (2.0, 0.0)
    g, se = paired_gain([3.0, 0.0, 5.0, 2.0], [0.0, 1.0, 2.0, 3.0])
    assert g == 1.0 and se == pytest.approx(math.sqrt(16 / 3) / 2)
    with pytest.raises(ValueError, match="same non-zero number"):
        paired_gain([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="no values"):
        mean_se([])
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match="p must be"):
            t_quantile(bad, 3)
    with pytest.raises(ValueError, match="df"):
        t_quantile(0.9, 0)
    with pytest.raises(ValueError, match="level"):
        t_interval([1.0, 2.0], level=1.0)


def test_cluster_paired_gain():
    from dpe_kernels.tools.eval.stats import cluster_mean, cluster_paired_gain

    # clusters of one are the plain paired gain
    a, b = [1.0, 2.5, 0.5, 4.0], [0.5, 2.0, 1.0, 3.0]
    assert cluster_paired_gain(a, b) == pytest.approx(paired_gain(a, b))
    # by hand: differences [1, 1] and [0, 2, -2]: mean 2/5; per-cluster sums of (d - m): 1.2, -1.2
    got = cluster_paired_gain([[2.0, 3.0], [1.0, 4.0, 0.0]], [[1.0, 2.0], [1.0, 2.0, 2.0]])
    assert got[0] == pytest.approx(0.4)
    assert got[1] == pytest.approx(math.sqrt(2 / 1 * (1.2 ** 2 + 1.2 ** 2)) / 5)
    # a shift common to a whole cluster counts once per cluster, not once per needle
    one = cluster_paired_gain([[1.0] * 10, [0.0] * 10], [[0.0] * 10, [0.0] * 10])
    iid = paired_gain([1.0] * 10 + [0.0] * 10, [0.0] * 20)
    assert one[0] == iid[0] == 0.5 and one[1] > 3 * iid[1]
    assert math.isnan(cluster_paired_gain([[1.0, 2.0]], [[0.0, 0.0]])[1])
    assert cluster_mean([[1.0, 2.0], 3.0]) == 2.0
    with pytest.raises(ValueError, match="cluster"):
        cluster_paired_gain([[1.0]], [[1.0, 2.0]])


def test_cluster_bootstrap():
    from dpe_kernels.tools.eval.stats import cluster_bootstrap

    iv = cluster_bootstrap([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.5, 0.5, 0.5], [0.2, 0.4, 0.3]], reps=4000)
    assert iv.mean == pytest.approx(0.45) and iv.n == 12
    assert 0.0 <= iv.low < iv.mean < iv.high <= 1.0
    # identical contexts: no spread at all, however many needles
    tight = cluster_bootstrap([[0.1, 0.9]] * 5)
    assert tight.low == pytest.approx(0.5) and tight.high == pytest.approx(0.5)
    assert math.isnan(cluster_bootstrap([[1.0, 2.0]]).low)
    assert math.isnan(cluster_bootstrap([[1.0, 2.0], [0.0, 3.0]]).high)  # 2 contexts: no honest interval
