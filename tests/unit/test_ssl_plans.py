"""ssl as data: settings refused before connecting, the certificate read from openssl's
words, the certbot commands planned, certbot's failures in one line, and ssl.issue's
whole run against a host given as data."""

from __future__ import annotations

import shlex
from datetime import UTC, datetime
from pathlib import Path

import pytest
from invoke.exceptions import Exit

from fabfile import ssl
from fabfile.core import certbot, certificates, remote
from fabfile.core import task as task_module
from fabfile.core.batch import ProbeResult
from fabfile.core.certbot import certbot_failure
from fabfile.core.certificates import (
    CERTIFICATE_PROBE,
    DEPLOY_HOOK,
    parse_certificate,
    parse_not_after,
    served_fingerprint_probe,
)
from fabfile.core.errors import ConfigError, OpsError, UsageError
from fabfile.core.settings import Settings, validate
from fabfile.nginx import SITE_FILE

missing = ProbeResult("", 1)
CERTBOT_OUTPUT = Path(__file__).parent / "certbot_output"
PEBBLE = "https://10.201.0.1:14000/dir"
DOMAINS = ("api.cntt.test", "metrics.cntt.test", "staging.api.cntt.test")
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
NOW_EPOCH = ProbeResult(str(int(NOW.timestamp())), 0)
FINGERPRINT = "A4:E3:19:35:00:11"

# openssl x509 -noout -issuer -enddate -fingerprint -sha256 -ext subjectAltName, as OpenSSL 3.5 printed it.
PEBBLE_CERTIFICATE = (
    "issuer=CN=Pebble Intermediate CA 6d901d\n"
    "notAfter=Dec  1 23:06:22 2031 GMT\n"
    f"sha256 Fingerprint={FINGERPRINT}\n"
    "X509v3 Subject Alternative Name: \n"
    "    DNS:api.cntt.test, DNS:metrics.cntt.test, DNS:staging.api.cntt.test"
)



def recorded(name: str) -> str:
    return (CERTBOT_OUTPUT / name).read_text()


# certbot 4.0's own words: recorded on a sandbox host (Pebble) or shaped like Let's Encrypt's answers.
PEBBLE_UNRESOLVED = recorded("pebble-unresolved.txt")
LETS_ENCRYPT_NXDOMAIN = recorded("lets-encrypt-nxdomain.txt")
ACME_REFUSED = recorded("acme-refused.txt")
ACME_UNRESOLVED = recorded("acme-unresolved.txt")
RATE_LIMITED = recorded("rate-limited.txt")


def ok(stdout=""):
    return ProbeResult(stdout, 0)


def certificate(*names, not_after="Dec  1 23:06:22 2031 GMT", fingerprint=FINGERPRINT, issuer="CN=Pebble Intermediate CA 6d901d"):
    return ok(f"issuer={issuer}\nnotAfter={not_after}\nsha256 Fingerprint={fingerprint}\n"
              "X509v3 Subject Alternative Name: \n    " + ", ".join(f"DNS:{name}" for name in names))


def test_settings(defaults, **dotted):
    values = {"domains.api": DOMAINS[0], "domains.metrics": DOMAINS[1], "domains.staging": DOMAINS[2],
              "ssl.email": "ops@cntt.test", "ssl.acme_server": PEBBLE, **dotted}
    return validate(Settings("production", defaults).with_overrides(values))


test_settings.__test__ = False  # a helper, not a test


@pytest.fixture
def wanted():
    return ssl.Wanted(DOMAINS, "ops@cntt.test", PEBBLE)


# --- the certificate as data ---------------------------------------------------------


def test_pebble_certificate_is_read_from_openssls_words():
    found = parse_certificate(ok(PEBBLE_CERTIFICATE))
    assert found.names == DOMAINS
    assert found.issuer == "Pebble Intermediate CA 6d901d"
    assert found.not_after == datetime(2031, 12, 1, 23, 6, 22, tzinfo=UTC)
    assert found.fingerprint == FINGERPRINT
    assert found.days_left(NOW) == 1826
    assert found.covers("API.cntt.test") and not found.covers("www.cntt.test")


def test_lets_encrypt_issuer_is_shown_by_its_common_name():
    found = parse_certificate(certificate("a.example.org", issuer="C = US, O = Let's Encrypt, CN = E5"))
    assert found.issuer == "E5"


def test_no_certificate_or_an_unreadable_one_is_none():
    assert parse_certificate(missing) is None
    assert parse_certificate(ok("unable to load certificate")) is None


@pytest.mark.parametrize("text,expected", [
    ("Dec  1 23:06:22 2031 GMT", datetime(2031, 12, 1, 23, 6, 22, tzinfo=UTC)),
    ("Feb 28 00:00:00 2027 GMT", datetime(2027, 2, 28, tzinfo=UTC)),
    ("2031-12-01", None),
])
def test_expiry_is_parsed_without_the_locale(text, expected):
    assert parse_not_after(text) == expected


def test_days_left_is_negative_once_expired():
    found = parse_certificate(certificate("a.example.org", not_after="Nov 29 12:00:00 2026 GMT"))
    assert found.days_left(NOW) == -2


def test_the_served_certificate_is_read_by_sni_on_loopback():
    assert served_fingerprint_probe("api.cntt.test") == (
        "echo | timeout 10 openssl s_client -connect 127.0.0.1:443 -servername api.cntt.test 2>/dev/null"
        " | openssl x509 -noout -fingerprint -sha256")


# --- settings, refused before connecting -----------------------------------------------


def test_issue_without_an_email_exits_2_before_connecting(refused_before_connecting):
    exit_ = refused_before_connecting(ssl.issue)
    assert exit_.code == 2
    assert exit_.message == ("error: missing config value 'ssl.email'; "
                             "set it in invoke.yaml or as COACHNTT_SSL__EMAIL=... in .env.production")


def test_a_threshold_that_is_not_a_number_exits_2_before_connecting(refused_before_connecting):
    exit_ = refused_before_connecting(ssl.status, env={"COACHNTT_SSL__MIN_DAYS_LEFT": "soon"})
    assert exit_.code == 2
    assert exit_.message == "error: COACHNTT_SSL__MIN_DAYS_LEFT must be a number, got 'soon'; fix the value"


@pytest.mark.parametrize("key,value,message", [
    ("ssl.email", "ops at example.com", "ssl.email must be an e-mail address like ops@example.com, got 'ops at example.com'"),
    ("ssl.email", "ops@example.com; rm -rf /", "ssl.email must be an e-mail address like ops@example.com, got 'ops@example.com; rm -rf /'"),
    ("ssl.acme_server", "http://acme.example.org/dir", "ssl.acme_server must be an https:// ACME directory URL, got 'http://acme.example.org/dir'"),
    ("ssl.acme_server", "https://x.org/dir?$(id)", "ssl.acme_server must be an https:// ACME directory URL, got 'https://x.org/dir?$(id)'"),
    ("ssl.min_days_left", 4000, "ssl.min_days_left must be a whole number of days from 0 to 3650, got '4000'"),
])
def test_bad_ssl_settings_are_refused_naming_key_and_value(defaults, key, value, message):
    with pytest.raises(ConfigError) as info:
        test_settings(defaults, **{key: value})
    assert info.value.what == message


def test_the_domains_are_those_nginx_serves_staging_only_when_enabled(defaults):
    assert ssl.wanted_from(test_settings(defaults)).domains == DOMAINS
    assert ssl.wanted_from(test_settings(defaults, **{"staging.enabled": False})).domains == DOMAINS[:2]


def test_the_defaults_point_at_lets_encrypt_and_warn_at_14_days(settings):
    assert settings.get("ssl.acme_server") == "https://acme-v02.api.letsencrypt.org/directory"
    assert settings.get("ssl.min_days_left") == 14
    assert settings.get("ssl.email") == ""


# --- the certificate step --------------------------------------------------------------


def certificate_facts(current=missing, server=None, acme=None):
    return {"certificate": current, "server": server or ok(PEBBLE), "now": NOW_EPOCH, "acme": acme or ok("200")}


def plan_for(wanted, **facts):
    return ssl.certificate_step(wanted, "deploy@vps").plan(certificate_facts(**facts))


def test_certonly_command_uses_the_webroot_the_lineage_and_the_server(wanted):
    args = shlex.split(certbot.certonly_command(wanted.domains, wanted.email, wanted.server))
    assert args[:2] == ["certbot", "certonly"]
    assert "--non-interactive" in args and "--agree-tos" in args and "--no-eff-email" in args
    assert args[args.index("--email") + 1] == "ops@cntt.test"
    assert args[args.index("--server") + 1] == PEBBLE
    assert args[args.index("--cert-name") + 1] == "coachntt"
    assert "--webroot" in args and args[args.index("--webroot-path") + 1] == "/var/www/html"
    assert [args[i + 1] for i, arg in enumerate(args) if arg == "--domain"] == list(DOMAINS)
    assert "--nginx" not in args, "certbot never edits nginx's files"
    assert "--force-renewal" not in args
    assert "--force-renewal" in shlex.split(certbot.certonly_command(wanted.domains, wanted.email, wanted.server, force=True))


def test_no_certificate_yet_plans_one_certbot_run_then_a_reload(wanted):
    (change,) = plan_for(wanted).changes
    assert change.summary == f"obtain a certificate for {', '.join(DOMAINS)} from {PEBBLE}"
    assert change.command.split("\n", 2) == ["mkdir -p /var/www/html",
                                              certbot.certonly_command(wanted.domains, wanted.email, wanted.server),
                                              f"if nginx -t -q 2>/dev/null; then {remote.RELOAD_NGINX}; fi"]
    assert "systemctl reload nginx" in remote.RELOAD_NGINX


def test_the_same_names_from_the_same_server_with_time_left_is_ok(wanted):
    plan = plan_for(wanted, current=ok(PEBBLE_CERTIFICATE))
    assert plan.changes == ()
    assert plan.reason == f"coachntt names {', '.join(DOMAINS)}; Pebble Intermediate CA 6d901d, 1826 days left"


def test_a_valid_certificate_needs_no_acme_server(wanted):
    assert plan_for(wanted, current=ok(PEBBLE_CERTIFICATE), acme=ProbeResult("curl: (7) Failed to connect", 7)).changes == ()


def test_a_changed_domain_list_reissues_the_same_lineage(wanted):
    (change,) = plan_for(wanted, current=certificate("api.cntt.test", "old.cntt.test")).changes
    assert change.summary == (f"reissue for {', '.join(DOMAINS)} "
                              "(adds metrics.cntt.test, staging.api.cntt.test; drops old.cntt.test)")
    args = shlex.split(change.command.splitlines()[1])
    assert args[args.index("--cert-name") + 1] == "coachntt"
    assert "--renew-with-new-domains" in args


def test_another_acme_server_forces_a_new_certificate(wanted):
    lets_encrypt = ok("https://acme-v02.api.letsencrypt.org/directory")
    (change,) = plan_for(wanted, current=ok(PEBBLE_CERTIFICATE), server=lets_encrypt).changes
    assert change.summary == f"reissue from {PEBBLE} (this one came from https://acme-v02.api.letsencrypt.org/directory)"
    assert "--force-renewal" in change.command


def test_a_trailing_slash_is_the_same_server(wanted):
    assert plan_for(wanted, current=ok(PEBBLE_CERTIFICATE), server=ok(PEBBLE + "/")).changes == ()


def test_a_certificate_inside_certbots_renewal_window_is_renewed(wanted):
    expiring = certificate(*DOMAINS, not_after="Dec 20 12:00:00 2026 GMT")
    (change,) = plan_for(wanted, current=expiring).changes
    assert change.summary == "renew: 19 days left"
    assert "--force-renewal" in change.command


@pytest.mark.parametrize("acme,said", [
    (ProbeResult("curl: (7) Failed to connect to 10.201.0.1 port 14999 after 0 ms: Could not connect to server\n000", 7),
     "curl: (7) Failed to connect to 10.201.0.1 port 14999 after 0 ms: Could not connect to server"),
    (ok("404"), "it answered HTTP 404, not an ACME directory"),
])
def test_an_unreachable_acme_server_is_refused_before_certbot_runs(wanted, acme, said):
    with pytest.raises(OpsError) as info:
        plan_for(wanted, acme=acme)
    assert info.value.one_line() == (f"cannot reach the ACME server {PEBBLE} from deploy@vps: {said}; "
                                     "check ssl.acme_server and that the host reaches it over HTTPS; nothing was changed")
    assert info.value.exit_code == 1


# --- certbot's failures in one line ---------------------------------------------------


def test_a_name_the_ca_cannot_validate_is_named_with_what_it_said():
    failure = certbot_failure(PEBBLE_UNRESOLVED)
    assert failure.kind == "validation"
    assert failure.what == ('the ACME server could not validate nowhere.cntt.test (Get "http://nowhere.cntt.test:80/.well-known/'
                            'acme-challenge/zhjVEAX": could not resolve URL "http://nowhere.cntt.test:80/.well-known/'
                            'acme-challenge/zhjVEAX")')


def test_every_name_the_ca_refused_is_named():
    what = certbot_failure(LETS_ENCRYPT_NXDOMAIN).what
    assert what.startswith("the ACME server could not validate metrics.example.org (DNS problem: NXDOMAIN looking up A")
    assert "; staging.example.org (203.0.113.9: Invalid response from" in what


@pytest.mark.parametrize("output,kind,what", [
    (ACME_REFUSED, "unreachable", "ValueError: Requesting 10.201.0.1/dir: Connection refused"),
    (ACME_UNRESOLVED, "unreachable", "Failed to renew certificate coachntt with error: HTTPSConnectionPool(host='acme.example.org', "
                                     "port=443): Max retries exceeded with url: /directory "
                                     "(Caused by NameResolutionError(\"failed to resolve\"))"),
    (RATE_LIMITED, "rate limit", "Error creating new order :: too many certificates (5) already issued for this exact set of "
                                 "identifiers in the last 168h0m0s, retry after 2026-12-02 10:00:00 UTC"),
    ("An unexpected error occurred:\nPermissionError: [Errno 13] Permission denied: '/etc/letsencrypt'\nAsk for help or search",
     "other", "PermissionError: [Errno 13] Permission denied: '/etc/letsencrypt'"),
    ("Requesting a certificate for api.example.org\nAn unexpected error occurred:\n"
     "Error creating new order :: too many new orders recently: see https://letsencrypt.org/docs/rate-limits/",
     "rate limit", "Error creating new order :: too many new orders recently: see https://letsencrypt.org/docs/rate-limits/"),
    ("", "other", "no output"),
])
def test_certbot_failures_are_sorted_by_what_to_do(output, kind, what):
    assert certbot_failure(output) == certbot.CertbotFailure(kind, what)


def test_issue_errors_say_what_to_do_and_that_nothing_changed(wanted):
    validation = ssl.issue_error(PEBBLE_UNRESOLVED, wanted, "deploy@vps")
    assert validation.what.startswith("the ACME server could not validate nowhere.cntt.test")
    assert validation.hint == ("point each name's DNS (A/AAAA) at this host with port 80 open, or fix domains.* / staging.enabled; "
                               "the certificate and nginx are as before")
    unreachable = ssl.issue_error(ACME_REFUSED, wanted, "deploy@vps")
    assert unreachable.what == (f"cannot reach the ACME server {PEBBLE} from deploy@vps: "
                                "ValueError: Requesting 10.201.0.1/dir: Connection refused")
    assert ssl.issue_error(RATE_LIMITED, wanted, "deploy@vps").what.startswith("the ACME server refused a new certificate: ")


# --- preflight and verification --------------------------------------------------------


def test_issue_needs_our_site_and_a_running_nginx():
    step = ssl.nginx_serving_step()
    with pytest.raises(UsageError) as info:
        step.plan({"site": missing, "active": ok("active")})
    assert info.value.one_line() == (f"{SITE_FILE} is missing: nginx does not answer ACME challenges yet; "
                                     "run `nginx` first, then `ssl.issue`")
    with pytest.raises(UsageError, match="nginx is inactive"):
        step.plan({"site": ok(), "active": ProbeResult("inactive", 3)})
    assert step.plan({"site": ok(), "active": ok("active")}).changes == ()


def verify_facts(served=FINGERPRINT, http=None):
    facts = {"certificate": ok(PEBBLE_CERTIFICATE)}
    for domain in DOMAINS:
        facts[f"tls:{domain}"] = ok(f"sha256 Fingerprint={served}")
        facts[f"http:{domain}"] = ok(http or f"301 https://{domain}/")
    return facts


def test_verify_passes_when_every_name_serves_the_file_and_http_redirects():
    plan = ssl.verify_step(DOMAINS, "deploy@vps").plan(verify_facts())
    assert plan.changes == () and plan.reason.startswith("3 domain(s) on :443 serve A4:E3:19:35")


def test_verify_fails_when_https_serves_another_certificate():
    with pytest.raises(OpsError, match="does not serve /etc/letsencrypt/live/coachntt/fullchain.pem for api.cntt.test, "):
        ssl.verify_step(DOMAINS, "deploy@vps").plan(verify_facts(served="00:11"))


def test_verify_fails_when_http_does_not_redirect():
    with pytest.raises(OpsError, match="plain HTTP on deploy@vps does not redirect to HTTPS"):
        ssl.verify_step(DOMAINS, "deploy@vps").plan(verify_facts(http="200 "))


# --- status ---------------------------------------------------------------------------


def status_facts(current=None, enabled="enabled", active="active", hook=None):
    return {"certificate": current or ok(PEBBLE_CERTIFICATE), "server": ok(PEBBLE), "now": NOW_EPOCH, "timer_enabled": ok(enabled),
            "timer_active": ok(active), "timer_next": ok("Wed 2026-12-02 02:27:00 UTC"), "hook": hook or ok()}


def test_status_shows_issuer_expiry_and_days_left_per_domain_and_the_schedule():
    report = ssl.status_report(DOMAINS, 14, status_facts())
    assert report.problems == []
    assert report.lines[0].split() == ["api.cntt.test", "Pebble", "Intermediate", "CA", "6d901d", "expires", "2031-12-01",
                                       "1826", "days", "left"]
    assert report.lines[3] == ("  renewal: scheduled (certbot.timer enabled and active, next Wed 2026-12-02 02:27:00 UTC); "
                               "deploy hook reloads nginx after nginx -t")


def test_status_fails_below_the_threshold_naming_the_days():
    report = ssl.status_report(DOMAINS, 2000, status_facts())
    assert report.problems == [(f"the certificate for {', '.join(DOMAINS)} expires in 1826 days (ssl.min_days_left is 2000)",
                                "run `ssl.renew`, and see `journalctl -u certbot` on the host for why the timer did not")]


def test_status_names_domains_the_certificate_does_not_cover():
    report = ssl.status_report(DOMAINS, 14, status_facts(current=certificate("api.cntt.test")))
    assert report.lines[1] == "  metrics.cntt.test            no certificate"
    assert report.problems[0] == ("no certificate names metrics.cntt.test, staging.api.cntt.test", "run `ssl.issue`")


def test_status_fails_when_renewal_is_not_scheduled():
    report = ssl.status_report(DOMAINS, 14, status_facts(enabled="disabled", active="inactive", hook=missing))
    assert "renewal: NOT scheduled (certbot.timer disabled, inactive)" in report.lines[3]
    assert [what for what, _ in report.problems] == ["renewal is not scheduled (certbot.timer disabled, inactive)",
                                                     f"the deploy hook {DEPLOY_HOOK} is missing"]


def test_status_task_reads_everything_in_one_round_trip_and_exits_1_below_the_threshold(project_context, mocker, fake_host,
                                                                                         monkeypatch, capsys):
    for key, value in {"COACHNTT_DOMAINS__API": DOMAINS[0], "COACHNTT_DOMAINS__METRICS": DOMAINS[1],
                       "COACHNTT_DOMAINS__STAGING": DOMAINS[2], "COACHNTT_SSL__MIN_DAYS_LEFT": "2000"}.items():
        monkeypatch.setenv(key, value)
    facts = {ssl.STATUS_PROBES[name]: (probe.stdout, probe.status) for name, probe in status_facts().items()}
    host = fake_host(facts)
    mocker.patch.object(task_module, "target_for", return_value=host)
    with pytest.raises(Exit) as info:
        ssl.status(project_context)
    assert info.value.code == 1
    assert info.value.message.startswith("error: the certificate for api.cntt.test, metrics.cntt.test, staging.api.cntt.test "
                                         "expires in 1826 days (ssl.min_days_left is 2000) on ")
    assert len(host.sent) == 1
    assert "1826 days left" in capsys.readouterr().out


# --- renew ----------------------------------------------------------------------------


def test_renew_never_sleeps_and_a_dry_run_goes_to_the_lineages_own_server_then_runs_the_hook():
    assert certbot.renew_command(dry_run=False) == "certbot renew --non-interactive --no-random-sleep-on-renew --cert-name coachntt"
    renew, hook = certbot.renew_command(dry_run=True, server=PEBBLE).splitlines()
    assert renew.endswith(f"--cert-name coachntt --dry-run --server {PEBBLE}")
    assert hook == DEPLOY_HOOK


def test_a_dry_run_for_lets_encrypt_leaves_certbot_to_pick_its_staging_directory():
    renew = certbot.renew_command(dry_run=True, server="https://acme-v02.api.letsencrypt.org/directory").splitlines()[0]
    assert renew.endswith("--dry-run") and "--server" not in renew


@pytest.mark.parametrize("output,dry_run,outcome", [
    ("Certificate not yet due for renewal\nNo renewals were attempted.", False, "ok"),
    ("Congratulations, all renewals succeeded:", False, "changed"),
    ("The dry run was successful.", True, "ok"),
])
def test_renew_outcomes(output, dry_run, outcome):
    assert certbot.renew_outcome(output, dry_run=dry_run)[0] == outcome


def test_a_deploy_hook_that_refuses_to_reload_is_the_error_line():
    output = ("Congratulations, all simulated renewals succeeded\n"
              "coachntt-reload-nginx: nginx -t failed, nginx NOT reloaded (still serves the previous certificate): "
              "nginx: [emerg] unknown directive \"garbage\"")
    error = ssl.renew_error(output, "deploy@vps")
    assert error.what.startswith("coachntt-reload-nginx: nginx -t failed, nginx NOT reloaded")
    assert error.hint.startswith("fix nginx's configuration")


def test_renew_without_a_certificate_says_to_issue_one(project_context, mocker, fake_host):
    host = fake_host({CERTIFICATE_PROBE: ("", 1), certificates.SERVER_PROBE: ("", 1), f"test -x {DEPLOY_HOOK}": ("", 1)})
    mocker.patch.object(task_module, "target_for", return_value=host)
    with pytest.raises(Exit) as info:
        ssl.renew(project_context, dry_run=True)
    assert info.value.code == 2
    assert info.value.message == "error: no certificate coachntt on localhost; run `ssl.issue` first"
    assert len(host.sent) == 1, "nothing but the facts"


# --- ssl.issue, the whole run against a host given as data -------------------------------


SS_NGINX_80 = 'LISTEN 0 511 0.0.0.0:80 0.0.0.0:* users:(("nginx",pid=2301,fd=5))'


@pytest.fixture
def issuing_host(fake_host, monkeypatch):
    """A host with our plain-HTTP site; once `certbot certonly` runs, the certificate exists and nginx serves it."""
    from fabfile import nginx

    for key, value in {"COACHNTT_DOMAINS__API": DOMAINS[0], "COACHNTT_DOMAINS__METRICS": DOMAINS[1],
                       "COACHNTT_DOMAINS__STAGING": DOMAINS[2], "COACHNTT_SSL__EMAIL": "ops@cntt.test",
                       "COACHNTT_SSL__ACME_SERVER": PEBBLE}.items():
        monkeypatch.setenv(key, value)

    class IssuingHost(fake_host):
        def _execute(self, command, timeout):
            result = super()._execute(command, timeout)
            if "certbot certonly" in command and result.ok:
                self.facts[CERTIFICATE_PROBE] = (PEBBLE_CERTIFICATE, 0)
                self.facts[certificates.SERVER_PROBE] = (PEBBLE, 0)
            return result

    hook = {command: ("", 1) for command in ssl.deploy_hook_step().probes.values()}
    facts = {
        nginx.LISTENERS: (SS_NGINX_80, 0), f"test -f {SITE_FILE}": ("", 0), "systemctl is-active nginx": ("active", 0),
        CERTIFICATE_PROBE: ("", 1), certificates.SERVER_PROBE: ("", 1), ssl.NOW_PROBE: (NOW_EPOCH.stdout, 0),
        f"curl -sS --max-time 10 -o /dev/null -w '%{{http_code}}' {PEBBLE} 2>&1": ("200", 0),
        **hook, "systemctl is-enabled certbot.timer": ("enabled", 0), "systemctl is-active certbot.timer": ("active", 0),
        f"cat -- {SITE_FILE}": ("# the plain HTTP site", 0), f"stat -c '%a %U:%G' -- {SITE_FILE}": ("644 root:root", 0),
        "nginx -v 2>&1": ("nginx version: nginx/1.26.3", 0),
    }
    for domain in DOMAINS:
        facts[served_fingerprint_probe(domain)] = (f"sha256 Fingerprint={FINGERPRINT}", 0)
        facts[ssl.verify_step((domain,), "x").probes[f"http:{domain}"]] = (f"301 https://{domain}/", 0)
    return IssuingHost(facts)


def test_issue_obtains_the_certificate_then_installs_the_hook_then_renders_tls(project_context, mocker, issuing_host, capsys):
    mocker.patch.object(task_module, "target_for", return_value=issuing_host)
    ssl.issue(project_context)
    certbot, hook, site = issuing_host.changes_sent
    assert "certbot certonly" in certbot and "--webroot" in certbot
    assert DEPLOY_HOOK in hook
    assert SITE_FILE in site
    out = capsys.readouterr().out
    assert "changed       site config" in out
    assert "ok            HTTPS serves it" in out
    assert not any("--nginx" in command for command in issuing_host.sent)


def test_a_failed_certbot_run_is_one_line_and_nothing_after_it_runs(project_context, mocker, issuing_host):
    issuing_host.replies["certbot certonly"] = (1, PEBBLE_UNRESOLVED, "")
    mocker.patch.object(task_module, "target_for", return_value=issuing_host)
    with pytest.raises(Exit) as info:
        ssl.issue(project_context)
    assert info.value.code == 1
    assert info.value.message.startswith("error: the ACME server could not validate nowhere.cntt.test (")
    assert "\n" not in info.value.message
    (certbot,) = issuing_host.changes_sent
    assert "certbot certonly" in certbot


def test_a_foreign_holder_of_443_stops_issue_before_any_change(project_context, mocker, issuing_host):
    from fabfile import nginx

    issuing_host.facts[nginx.LISTENERS] = (SS_NGINX_80 + '\nLISTEN 0 5 0.0.0.0:443 0.0.0.0:* users:(("python3",pid=77,fd=3))', 0)
    mocker.patch.object(task_module, "target_for", return_value=issuing_host)
    with pytest.raises(Exit) as info:
        ssl.issue(project_context)
    assert info.value.message == "error: port 443 is held by python3 (pid 77); stop it or move it, then rerun"
    assert issuing_host.changes_sent == []


# --- the deploy hook, run with stand-ins for nginx and systemctl -------------------------


def run_hook(tmp_path, nginx_status: int) -> tuple[int, list[str], str]:
    import os
    import subprocess

    from fabfile.core import templates

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "systemctl.log"
    (bin_dir / "nginx").write_text(f"#!/bin/sh\necho 'nginx: [emerg] unknown directive \"garbage\"' >&2\nexit {nginx_status}\n")
    (bin_dir / "systemctl").write_text(f"#!/bin/sh\necho \"$*\" >> {calls}\n")
    hook = tmp_path / "coachntt-reload-nginx"
    hook.write_text(templates.render("letsencrypt/coachntt-reload-nginx"))
    for path in (*bin_dir.iterdir(), hook):
        path.chmod(0o755)
    result = subprocess.run([str(hook)], env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
                            capture_output=True, text=True, timeout=10)
    return result.returncode, calls.read_text().splitlines() if calls.exists() else [], result.stderr


def test_the_deploy_hook_reloads_nginx_when_its_config_passes(tmp_path):
    assert run_hook(tmp_path, nginx_status=0)[:2] == (0, ["reload nginx"])


def test_the_deploy_hook_never_reloads_a_config_that_fails_nginx_t(tmp_path):
    status, calls, stderr = run_hook(tmp_path, nginx_status=1)
    assert (status, calls) == (1, [])
    assert stderr.startswith("coachntt-reload-nginx: nginx -t failed, nginx NOT reloaded (still serves the previous certificate): "
                             "nginx: [emerg] unknown directive")


def test_the_deploy_hook_is_installed_executable_where_certbot_runs_deploy_hooks():
    step = ssl.deploy_hook_step()
    (change,) = step.plan({"content": missing, "meta": missing}).changes
    assert DEPLOY_HOOK == "/etc/letsencrypt/renewal-hooks/deploy/coachntt-reload-nginx"
    assert change.summary.startswith(f"create {DEPLOY_HOOK} (") and "mode 0755, root:root" in change.summary
