"""The documentation against the code: the tables that list what the code has (fuzz targets,
endpoints, the filter's and the rate-limit service's metrics) name exactly what it has, every relative link leads somewhere, every page
of docs/ is one link from the README, and the benches' tables have their place in
docs/performance.md. Reads files only: no Envoy, no build."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

NEEDS_BUILD = False


def repository_root() -> Path:
    # Found by its landmarks, so the test may live at any depth of integration-tests/.
    for directory in Path(__file__).resolve().parents:
        if (directory / "Cargo.toml").exists() and (directory / "build.sh").exists():
            return directory
    raise RuntimeError("no repository root above " + __file__)


ROOT = repository_root()
DOCS = ROOT / "docs"
FILTER_SRC = ROOT / "filter" / "src"


def table_rows(page: Path, header: str) -> list[list[str]]:
    """The body rows (as lists of cells) of the table in `page` whose header row's first cell
    starts with `header`."""
    rows: list[list[str]] = []
    in_table = False
    for line in page.read_text().splitlines():
        if not line.startswith("|"):
            if in_table:
                break
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not in_table:
            in_table = cells[0].startswith(header)
        elif not set(cells[0]) <= set("-: "):
            rows.append(cells)
    assert rows, f"{page.relative_to(ROOT)} has no table headed {header!r}"
    return rows


def table_first_column(page: Path, header: str) -> list[str]:
    return [cells[0] for cells in table_rows(page, header)]


def quoted(cells: list[str]) -> list[str]:
    """Every `name` in backticks, in order."""
    return [name for cell in cells for name in re.findall(r"`([^`]+)`", cell)]


def function_body(source: str, name: str) -> str:
    """The text of `fn name` from its opening brace to the matching closing one."""
    start = source.index(f"fn {name}(")
    opening = source.index("{", start)
    depth = 0
    for offset, char in enumerate(source[opening:]):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return source[opening : opening + offset + 1]
    raise ValueError(f"fn {name} does not close")


def without_tests(source: str) -> str:
    return source.split("#[cfg(test)]", 1)[0]


def filter_sources() -> dict[Path, str]:
    return {
        path: without_tests(path.read_text())
        for path in sorted(FILTER_SRC.rglob("*.rs"))
        if path.name != "tests.rs" and "tests" not in path.relative_to(FILTER_SRC).parts
    }


def test_the_fuzz_table_lists_every_target():
    fuzz = ROOT / "filter" / "fuzz"
    documented = quoted(table_first_column(DOCS / "hostile-input.md", "Target"))
    sources = {path.stem for path in (fuzz / "fuzz_targets").glob("*.rs")}
    bins = {entry["name"] for entry in tomllib.loads((fuzz / "Cargo.toml").read_text())["bin"]}
    assert len(documented) == len(set(documented)), f"a target is listed twice: {documented}"
    assert set(documented) == sources, "docs/hostile-input.md vs filter/fuzz/fuzz_targets/*.rs"
    assert set(documented) == bins, "docs/hostile-input.md vs the [[bin]]s of filter/fuzz/Cargo.toml"


def endpoints_in_code() -> dict[str, str]:
    """Each endpoint's path below /v1/ and the service type it belongs to, from endpoint.rs."""
    source = (FILTER_SRC / "endpoint.rs").read_text()
    suffix = dict(re.findall(r"Endpoint::(\w+) => \"([^\"]+)\"", function_body(source, "suffix")))
    key = dict(re.findall(r"ServiceType::(\w+) => \"([^\"]+)\"", function_body(source, "key")))
    service: dict[str, str] = {}
    for variants, service_type in re.findall(r"((?:Endpoint::\w+\s*\|?\s*)+)=>\s*ServiceType::(\w+)",
                                             function_body(source, "service")):
        for variant in re.findall(r"Endpoint::(\w+)", variants):
            service[variant] = key[service_type]
    assert suffix and set(suffix) == set(service), "endpoint.rs: suffix() and service() name other endpoints"
    return {path: service[variant] for variant, path in suffix.items()}


def test_the_endpoint_table_lists_every_endpoint_with_its_service():
    documented: dict[str, str] = {}
    for cells in table_rows(DOCS / "requests.md", "Endpoint"):
        (service_type,) = quoted([cells[1]])
        for path in quoted([cells[0]]):
            assert path not in documented, f"{path} is listed twice"
            documented[path] = service_type
    assert documented == endpoints_in_code(), "docs/requests.md vs filter/src/endpoint.rs"


def metric_names(sources, prefix: str = "jairouter_") -> set[str]:
    """The metric names quoted in `sources`, a histogram's series under its own name."""
    names: set[str] = set()
    for source in sources:
        for name in re.findall(rf"\"({prefix}[a-z0-9_]+)", source):
            names.add(re.sub(r"_(sum|count|bucket)$", "", name))
    return names


def test_the_metrics_table_lists_every_metric_the_filter_exports():
    documented = quoted(table_first_column(DOCS / "observability.md", "Metric"))
    in_code = metric_names(filter_sources().values())
    assert "jairouter_requests_total" in in_code, "the metric names in filter/src were not found"
    assert set(documented) == in_code, "docs/observability.md's metrics vs the names in filter/src"


def test_the_genai_table_lists_every_genai_metric():
    documented = quoted(table_first_column(DOCS / "observability.md", "Semantic convention"))
    in_code = set(re.findall(r"&str = \"(gen_ai\.[a-z_.]+)\"", (FILTER_SRC / "metrics.rs").read_text()))
    assert in_code, "no gen_ai metric names in filter/src/metrics.rs"
    assert set(documented) == in_code, "docs/observability.md's GenAI metrics vs filter/src/metrics.rs"


def test_the_rate_limit_services_page_lists_every_metric_it_exports():
    service = ROOT / "envoy" / "ratelimit"
    in_code = metric_names(without_tests(path.read_text()) for path in (service / "src").glob("*.rs"))
    page = (service / "README.md").read_text()
    documented = set(re.findall(r"^\s*- `(jairouter_ratelimit_[a-z0-9_]+)", page, flags=re.M))
    assert "jairouter_ratelimit_calls_total" in in_code, "the metric names in envoy/ratelimit/src were not found"
    assert documented == in_code, "envoy/ratelimit/README.md's metrics vs envoy/ratelimit/src"


def heading_anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    fenced = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (heading := re.match(r"#{1,6} (.+)", line)):
            found.add(heading_anchor(heading.group(1)))
    return found


def relative_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return [target for target in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", target)]


PAGES = [*sorted(ROOT.glob("*.md")), *sorted(DOCS.glob("*.md")),
         *(page for tree in ("envoy", "k8s", "filter") for page in sorted((ROOT / tree).rglob("*.md"))
           if "target" not in page.parts)]


def test_every_relative_link_leads_to_a_file_and_heading():
    broken = []
    for page in PAGES:
        for target in relative_links(page):
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in anchors(linked)):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_every_page_of_docs_is_one_link_from_the_readme():
    readme = ROOT / "README.md"
    linked = {(readme.parent / target.partition("#")[0]).resolve() for target in relative_links(readme)}
    unlinked = [page.name for page in DOCS.glob("*.md") if page.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"
    assert len(readme.read_text().splitlines()) < 300, "the README is for a newcomer: under 300 lines"


def test_the_benches_write_their_tables_into_docs_performance_only():
    performance = (DOCS / "performance.md").read_text()
    sections = set()
    for bench in (ROOT / "integration-tests").rglob("bench*.py"):
        for call in re.findall(r"write_performance_doc\(report(?:, \"([a-z-]+)\")?\)", bench.read_text()):
            sections.add(call or "bench")
    assert sections >= {"bench", "hostcalls", "global-limits"}, f"the benches' sections: {sections}"
    for section in sections:
        assert f"<!-- {section}:begin -->" in performance and f"<!-- {section}:end -->" in performance, section
    assert ":begin -->" not in (ROOT / "README.md").read_text(), "a bench section left in the README"
