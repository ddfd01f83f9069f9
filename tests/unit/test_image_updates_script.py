"""scripts/image-updates.sh's contract, against stand-ins for docker and curl on a PATH
of nothing else: how references are read, which registry is asked (and how), and the
verdict for each image. Nothing leaves this machine."""

from __future__ import annotations

import subprocess

import pytest
from stand_ins import script_path

from fabfile.core.templates import SCRIPTS_DIR
from fabfile.deps import parse_image_lines

SCRIPT = SCRIPTS_DIR / "image-updates.sh"
PLAIN_TOOLS = ("sh", "sed", "tr", "tail", "cat", "grep")
NEW, OLD = "sha256:" + "b" * 64, "sha256:" + "a" * 64

STAND_INS = {
    # docker image inspect IMAGE: the digests in $REC/digests ("IMAGE DIGESTS..."), absent: not on the host.
    "docker": r"""#!/bin/sh
image=$(eval echo "\${$#}")
line=$(grep -F "$image " "$REC/digests") || exit 1
echo "${line#* }"
""",
    # curl: logs its arguments; a HEAD answers from $REC/heads/<url with / as _>, a token GET from $REC/token.
    "curl": r"""#!/bin/sh
echo "curl $*" >> "$REC/calls"
case " $* " in
*" -I "*) for a in "$@"; do url=$a; done
          file="$REC/heads/$(echo "$url" | tr '/:' '__')"
          [ -f "$file" ] || { echo "curl: (6) Could not resolve host"; exit 6; }
          case " $* " in *"Authorization: Bearer tok123"*) file="$file.authed" ;; esac
          cat "$file" ;;
*) cat "$REC/token" ;;
esac
""",
}


@pytest.fixture
def host(tmp_path):
    bin_dir, rec = tmp_path / "bin", tmp_path / "rec"
    (rec / "heads").mkdir(parents=True)
    script_path(bin_dir, PLAIN_TOOLS, STAND_INS)

    def run(*images: str, digests: dict[str, str], heads: dict[str, str], token: str = "") -> list[tuple[str, str, str]]:
        (rec / "digests").write_text("".join(f"{image} {value}\n" for image, value in digests.items()))
        for url, text in heads.items():
            (rec / "heads" / url.replace("/", "_").replace(":", "_")).write_text(text.replace("\n", "\r\n"))
        (rec / "token").write_text(token)
        result = subprocess.run(["sh", str(SCRIPT), *images], capture_output=True, text=True, timeout=30,
                                env={"PATH": str(bin_dir), "REC": str(rec)})
        assert result.returncode == 0, result.stderr
        return parse_image_lines(result.stdout)

    run.calls = lambda: (rec / "calls").read_text().splitlines() if (rec / "calls").exists() else []
    return run


def answer(digest: str) -> str:
    return f"HTTP/1.1 200 OK\nDocker-Content-Digest: {digest}\nContent-Type: application/vnd.oci.image.index.v1+json\n"


def test_a_loopback_registry_is_asked_over_http_and_a_new_digest_is_an_update(host):
    found = host("127.0.0.1:5000/coachntt/postgres:17-trixie", "127.0.0.1:5000/coachntt/base:3.13",
                 digests={"127.0.0.1:5000/coachntt/postgres:17-trixie": f"127.0.0.1:5000/coachntt/postgres@{OLD}",
                          "127.0.0.1:5000/coachntt/base:3.13": f"127.0.0.1:5000/coachntt/base@{NEW}"},
                 heads={"http://127.0.0.1:5000/v2/coachntt/postgres/manifests/17-trixie": answer(NEW),
                        "http://127.0.0.1:5000/v2/coachntt/base/manifests/3.13": answer(NEW)})
    assert found == [("127.0.0.1:5000/coachntt/postgres:17-trixie", "update", f"127.0.0.1:5000 has {NEW}"),
                     ("127.0.0.1:5000/coachntt/base:3.13", "current", NEW)]
    assert all(" -I " in call and "application/vnd.oci.image.index.v1+json" in call for call in host.calls())


def test_docker_hub_names_get_library_and_an_anonymous_token_as_docker_pull_does(host):
    challenge = ('HTTP/1.1 401 Unauthorized\nWww-Authenticate: Bearer realm="https://auth.docker.io/token",'
                 'service="registry.docker.io",scope="repository:library/postgres:pull"\n')
    hub = "https://registry-1.docker.io/v2/library/postgres/manifests/17"
    found = host("postgres:17", digests={"postgres:17": f"postgres@{NEW}"},
                 heads={hub: challenge, f"{hub}.authed": answer(NEW)}, token='{"token": "tok123", "expires_in": 300}')
    assert found == [("postgres:17", "current", NEW)]
    calls = host.calls()
    assert calls[0].endswith(hub)
    assert "-G https://auth.docker.io/token --data-urlencode service=registry.docker.io " \
           "--data-urlencode scope=repository:library/postgres:pull" in calls[1]
    assert "Authorization: Bearer tok123" in calls[2]


def test_a_registry_that_wants_a_login_is_unknown_not_current(host):
    challenge = 'HTTP/1.1 401 Unauthorized\nWww-Authenticate: Bearer realm="https://auth.example.org/token",service="x"\n'
    found = host("registry.example.org/private/app:3", digests={"registry.example.org/private/app:3": f"r/p@{OLD}"},
                 heads={"https://registry.example.org/v2/private/app/manifests/3": challenge}, token='{"errors": []}')
    assert found == [("registry.example.org/private/app:3", "unknown", "cannot ask registry.example.org: the registry wants a login")]


def test_images_built_here_missing_or_unreachable_say_so(host):
    found = host("coachntt/api:abc123", "gone/image:1", "registry.example.org/team/app:2.1",
                 digests={"coachntt/api:abc123": "", "registry.example.org/team/app:2.1": f"registry.example.org/team/app@{OLD}"},
                 heads={})
    assert found == [
        ("coachntt/api:abc123", "local", "built or loaded here: no registry digest to compare"),
        ("gone/image:1", "missing", "not on this host"),
        ("registry.example.org/team/app:2.1", "unknown", "cannot ask registry.example.org: curl: (6) Could not resolve host"),
    ]
