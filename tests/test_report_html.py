"""``kvtrim report --html``: one self-contained page, opened in a real headless browser (Chromium,
driven by Selenium): every row is there, the tables sort, every plot renders, nothing is fetched."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from cli_runner import run_process
from conftest import make_model, make_tokenizer

from kvtrim.bench.config import BenchConfig
from kvtrim.bench.run import run_bench

SWEEP = Path(__file__).resolve().parents[1] / "docs" / "ruler_2k_sweep.csv"


def _browser():
    if os.environ.get("KVTRIM_SKIP_BROWSER") == "1":
        pytest.skip("KVTRIM_SKIP_BROWSER=1")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail(
            "Chromium and chromedriver are needed (make setup installs them: apt-get install chromium "
            "chromium-driver); set KVTRIM_SKIP_BROWSER=1 to skip this test."
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(driver))


@pytest.fixture(scope="module")
def browser():
    driver = _browser()
    yield driver
    driver.quit()


def _report(*sources: str | Path, out: Path) -> Path:
    result = run_process("report", *map(str, sources), "--html", "--out", str(out), timeout=600)
    assert result.returncode == 0, result.stderr
    return out


def _column(browser, table: str, index: int) -> list[float]:
    script = (
        f"return Array.from(document.querySelectorAll('#{table} tbody tr'))"
        f".map(r => r.cells[{index}].dataset.v)"
    )
    return [float(v) for v in browser.execute_script(script)]


def test_the_sweep_page_holds_every_row_sorts_and_draws(browser, tmp_path):
    from selenium.webdriver.common.by import By

    page = _report(SWEEP, out=tmp_path / "sweep.html")
    html = page.read_text(encoding="utf-8")
    fetched = re.findall(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", html) + re.findall(r"<link\b", html)
    assert not fetched  # self-contained: nothing for the browser to fetch
    browser.get(page.as_uri())
    lines = SWEEP.read_text(encoding="utf-8").splitlines()[1:]
    n_rows = len(lines)
    assert n_rows > 7000  # the committed sweep, not an empty file
    assert browser.execute_script("return document.querySelectorAll('#rows tbody tr').length") == n_rows
    score = browser.find_elements(By.CSS_SELECTOR, "#leaderboard th")[4]
    score.click()
    ascending = _column(browser, "leaderboard", 4)
    assert ascending == sorted(ascending)
    score.click()
    assert _column(browser, "leaderboard", 4) == sorted(ascending, reverse=True)
    browser.find_element(By.CSS_SELECTOR, "details summary").click()  # unfold every row
    browser.find_elements(By.CSS_SELECTOR, "#rows th")[5].click()
    assert _column(browser, "rows", 5) == sorted(_column(browser, "rows", 5))
    widths = browser.execute_script(
        "return Array.from(document.querySelectorAll('figure.plot svg')).map(s => s.getBBox().width)"
    )
    fields = [line.split(",") for line in lines]
    series = {f[2] + ("" if f[3] == "uniform" else "+" + f[3]) for f in fields if f[2] != "none"}
    assert len(widths) == len(series) + 2 and all(w > 100 for w in widths)  # all, one per series, kept
    box = browser.find_element(By.ID, "filter")
    box.send_keys("average tova")
    visible = browser.execute_script(
        "return Array.from(document.querySelectorAll('#leaderboard tbody tr')).filter(r => !r.hidden)"
        ".map(r => r.cells[0].textContent + ' ' + r.cells[1].textContent)"
    )
    assert visible and all(v.startswith("average tova") for v in visible)


def test_several_runs_are_merged_into_one_page(browser, tmp_path):
    model, tok = make_model("llama", max_positions=2048), make_tokenizer()
    common = dict(tasks=["niah_single_1"], ratios=[0.0, 0.5], length=640, samples=2, max_new_tokens=6)
    run_bench(model, tok, BenchConfig(methods=["knorm"], **common), tmp_path / "a", progress=False)
    run_bench(
        model,
        tok,
        BenchConfig(methods=["tova"], budgets=["adaptive"], **common),
        tmp_path / "b",
        progress=False,
    )
    page = _report(tmp_path / "a", tmp_path / "b", out=tmp_path / "both.html")
    browser.get(page.as_uri())
    cells = browser.execute_script(
        "return Array.from(document.querySelectorAll('#leaderboard tbody tr'))"
        ".map(r => [0, 1, 2, 6].map(i => r.cells[i].textContent))"
    )
    averages = {(m, b) for t, m, b, _ in cells if t == "average"}
    assert averages == {("none", "uniform"), ("knorm", "uniform"), ("tova", "adaptive")}
    assert all(kept != "–" for *_, kept in cells)  # bench rows carry their bytes
    assert browser.execute_script("return document.querySelectorAll('#rows tbody tr').length") == 8
    assert browser.execute_script("return document.querySelectorAll('h3').length") == 2  # both configurations
    heat_map = browser.execute_script(
        "var f = document.getElementById('plot-needle_grid');"
        "return f && f.querySelector('svg').getBBox().width"
    )
    assert heat_map and heat_map > 100  # bench rows carry the needle's depth
