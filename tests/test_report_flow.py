"""The catalog flow writes its HTML report and links it from its Prefect artifacts (Prefect's ephemeral
API and a local Ray instance, as in tests/test_catalog_flow.py)."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest
import soundfile as sf

from demix.pipeline.data.synth import toy_song

pytest_plugins = ["conftest_services"]

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def flow_env(ray_cluster, prefect_api):
    return ray_cluster, prefect_api


def test_flow_writes_the_report_and_links_it(tmp_path, flow_env):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from demix.flows.separate_catalog import separate_catalog

    cat = tmp_path / "in"
    cat.mkdir()
    for i in range(2):
        sf.write(cat / f"good {i}.wav", toy_song(3.0, 8000, seed=i)["mixture"].T, 8000)
    (cat / "broken.wav").write_bytes(b"RIFF not really")
    out = tmp_path / "out"
    state = separate_catalog(
        catalog=str(cat), out=str(out), model="test-gain", registry_module="demix_test_models",
        settings={"segment": 1.0}, workers_count=1, shard_size=2, progress=False, return_state=True,
    )
    summary = state.result()
    assert (summary["ok_now"], summary["failed_now"]) == (2, 1)
    assert summary["report"] == str(out / "report" / "index.html")
    page = Path(summary["report"]).read_text()
    failures = re.findall(r"<tr>(.*?)</tr>", re.search(r'<table id="failures".*?<tbody>(.*?)</tbody>', page, re.S).group(1))
    assert len(failures) == 1 and "broken.wav" in failures[0] and "decode" in failures[0]
    assert set(summary["stage_seconds"]) == {"plan", "separate and commit", "consolidate manifests"}
    assert re.search(r"<td>plan</td>", page) and "separated (last run)" in page
    media = re.findall(r'<(?:img|audio)[^>]* src="([^"]+)"', page)
    assert len(media) == 2 * 2 * 5 and all((out / "report" / unquote(m)).is_file() for m in media)

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        )
    by_key = {a.key: a for a in artifacts}
    link = (out / "report" / "index.html").resolve().as_uri()
    assert f"({link})" in by_key["separate-catalog-report"].data, "the Markdown summary links to the report"
    assert link in by_key["separate-catalog-report-html"].data
