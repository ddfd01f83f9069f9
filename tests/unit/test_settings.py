"""Settings layering: invoke.yaml < .env.<env> < process environment < task flags."""

from __future__ import annotations

import fabric
import invoke
import pytest

from fabfile.core import redact, settings
from fabfile.core.errors import EXIT_USAGE, ConfigError


def write_env(tmp_path, text, env="production"):
    path = tmp_path / f".env.{env}"
    path.write_text(text)
    return path


# --- layers -----------------------------------------------------------------


def test_invoke_yaml_defaults_are_the_base_layer(defaults, tmp_path):
    s = settings.load(defaults, environ={}, project_dir=tmp_path)
    assert s.env == "production"
    assert s.get("deploy_user") == "coachntt"
    assert s.get("app.branch") == "main"
    assert s.get("thresholds.disk_free_percent_min") == 20
    assert s.get("firewall.allow") == ["22/tcp", "80/tcp", "443/tcp"]


def test_env_file_value_overrides_invoke_yaml_default(defaults, tmp_path):
    write_env(tmp_path, "COACHNTT_APP__BRANCH=release\nCOACHNTT_DEPLOY_USER=ops\n")
    s = settings.load(defaults, environ={}, project_dir=tmp_path)
    assert s.get("app.branch") == "release"
    assert s.get("deploy_user") == "ops"
    assert s.get("app.dir") == "/opt/coachntt", "siblings of an overridden key keep their default"


def test_process_environment_overrides_env_file(defaults, tmp_path):
    write_env(tmp_path, "COACHNTT_APP__BRANCH=release\n")
    s = settings.load(defaults, environ={"COACHNTT_APP__BRANCH": "hotfix"}, project_dir=tmp_path)
    assert s.get("app.branch") == "hotfix"


def test_command_line_overrides_win_over_every_other_layer(defaults, tmp_path):
    write_env(tmp_path, "COACHNTT_APP__BRANCH=release\n")
    s = settings.load(defaults, environ={"COACHNTT_APP__BRANCH": "hotfix"}, project_dir=tmp_path)
    flagged = s.with_overrides({"app.branch": "hotfix-2", "app.dir": None})
    assert flagged.get("app.branch") == "hotfix-2"
    assert flagged.get("app.dir") == "/opt/coachntt", "a flag left unset (None) does not override"
    assert s.get("app.branch") == "hotfix", "with_overrides returns a new Settings"


def test_defaults_passed_in_are_not_mutated(defaults, tmp_path):
    write_env(tmp_path, "COACHNTT_APP__BRANCH=release\n")
    settings.load(defaults, environ={}, project_dir=tmp_path)
    assert defaults["app"]["branch"] == "main"


def test_env_file_can_add_a_setting_that_has_no_default(defaults, tmp_path):
    write_env(tmp_path, "COACHNTT_HOST=coachntt@10.201.0.2\n")
    s = settings.load(defaults, environ={}, project_dir=tmp_path)
    assert s.get("host") == "coachntt@10.201.0.2"


def test_missing_env_file_is_fine(defaults, tmp_path):
    s = settings.load(defaults, environ={}, project_dir=tmp_path / "nowhere")
    assert s.get("app.branch") == "main"
    assert s.secrets == {}


def test_control_variables_do_not_become_settings(defaults, tmp_path):
    s = settings.load(defaults, environ={"COACHNTT_ENV": "staging", "COACHNTT_ACCEPT_NEW_HOST_KEY": "1"}, project_dir=tmp_path)
    assert s.get("env") is None
    assert s.get("accept_new_host_key") is None


def test_key_nesting_below_a_scalar_setting_is_a_config_error(defaults, tmp_path):
    write_env(tmp_path, "COACHNTT_APP__BRANCH__X=1\n")
    with pytest.raises(ConfigError, match="COACHNTT_APP__BRANCH__X"):
        settings.load(defaults, environ={}, project_dir=tmp_path)


# --- coercion ---------------------------------------------------------------


def test_env_values_take_the_type_of_the_default_they_replace(tmp_path):
    defaults = {"app": {"health_deadline": 30}, "firewall": {"allow": ["22/tcp"]}, "feature": {"on": False, "off": True}}
    environ = {
        "COACHNTT_APP__HEALTH_DEADLINE": "45",
        "COACHNTT_FIREWALL__ALLOW": "22/tcp, 443/tcp,,",
        "COACHNTT_FEATURE__ON": "yes",
        "COACHNTT_FEATURE__OFF": "0",
    }
    s = settings.load(defaults, environ=environ, project_dir=tmp_path)
    assert s.get("app.health_deadline") == 45
    assert s.get("firewall.allow") == ["22/tcp", "443/tcp"]
    assert s.get("feature.on") is True
    assert s.get("feature.off") is False


@pytest.mark.parametrize("raw", ["1", "true", "TRUE", "yes", "on", " On "])
def test_truthy_spellings_become_true(raw, tmp_path):
    s = settings.load({"flag": False}, environ={"COACHNTT_FLAG": raw}, project_dir=tmp_path)
    assert s.get("flag") is True


def test_a_non_number_for_a_number_setting_is_a_config_error(defaults, tmp_path):
    with pytest.raises(ConfigError) as info:
        settings.load(defaults, environ={"COACHNTT_SSH__CONNECT_TIMEOUT": "ten"}, project_dir=tmp_path)
    assert info.value.what == "COACHNTT_SSH__CONNECT_TIMEOUT must be a number, got 'ten'"
    assert info.value.exit_code == EXIT_USAGE


def test_file_value_is_coerced_then_environment_coerces_against_it(tmp_path):
    write_env(tmp_path, "COACHNTT_RETRIES=5\n")
    s = settings.load({"retries": 3}, environ={"COACHNTT_RETRIES": "7"}, project_dir=tmp_path)
    assert s.get("retries") == 7


# --- environment selection --------------------------------------------------


def test_production_is_the_default_environment(defaults, tmp_path):
    write_env(tmp_path, "COACHNTT_APP__BRANCH=prod-branch\n", env="production")
    assert settings.load(defaults, environ={}, project_dir=tmp_path).get("app.branch") == "prod-branch"


def test_coachntt_env_selects_which_env_file_is_read(defaults, tmp_path):
    write_env(tmp_path, "COACHNTT_APP__BRANCH=prod-branch\n", env="production")
    write_env(tmp_path, "COACHNTT_APP__BRANCH=staging-branch\n", env="staging")
    s = settings.load(defaults, environ={"COACHNTT_ENV": "staging"}, project_dir=tmp_path)
    assert s.env == "staging"
    assert s.get("app.branch") == "staging-branch"


def test_coachntt_env_file_points_at_an_explicit_file(defaults, tmp_path):
    other = tmp_path / "elsewhere.env"
    other.write_text("COACHNTT_APP__BRANCH=from-explicit-file\n")
    write_env(tmp_path, "COACHNTT_APP__BRANCH=prod-branch\n")
    s = settings.load(defaults, environ={"COACHNTT_ENV_FILE": str(other)}, project_dir=tmp_path)
    assert s.get("app.branch") == "from-explicit-file"


def test_unknown_environment_is_refused_with_the_choices(defaults, tmp_path):
    with pytest.raises(ConfigError) as info:
        settings.load(defaults, environ={"COACHNTT_ENV": "prod"}, project_dir=tmp_path)
    assert info.value.what == "COACHNTT_ENV must be one of production, staging, sandbox, got 'prod'"
    assert info.value.exit_code == EXIT_USAGE


# --- secrets ----------------------------------------------------------------


def test_plain_keys_in_env_file_are_secrets_kept_out_of_values_and_redacted(defaults, tmp_path):
    write_env(tmp_path, "JWT_SECRET=s3cr3t-jwt-value\nAPI_KEY=key-1234567890\nCOACHNTT_APP__BRANCH=release\n")
    s = settings.load(defaults, environ={}, project_dir=tmp_path)
    assert s.secrets == {"JWT_SECRET": "s3cr3t-jwt-value", "API_KEY": "key-1234567890"}
    assert "s3cr3t-jwt-value" not in repr(s.values)
    assert "s3cr3t-jwt-value" not in repr(s), "Settings repr must not show secrets"
    assert redact.redact("token=s3cr3t-jwt-value key=key-1234567890") == f"token={redact.MASK} key={redact.MASK}"


def test_known_secret_names_are_taken_from_the_process_environment(defaults, tmp_path):
    environ = {"DATABASE_URL": "postgresql://u:pw-from-ci@db/x", "HOME": "/root", "PATH": "/usr/bin"}
    s = settings.load(defaults, environ=environ, project_dir=tmp_path)
    assert s.secrets == {"DATABASE_URL": "postgresql://u:pw-from-ci@db/x"}
    assert redact.redact("postgresql://u:pw-from-ci@db/x") == redact.MASK


def test_process_environment_secret_overrides_env_file_secret(defaults, tmp_path):
    write_env(tmp_path, "JWT_SECRET=from-the-file-123\n")
    s = settings.load(defaults, environ={"JWT_SECRET": "from-the-env-456"}, project_dir=tmp_path)
    assert s.secrets["JWT_SECRET"] == "from-the-env-456"


@pytest.mark.parametrize("key", ["password", "db_password", "jwt_secret", "github_token", "API_KEY"])
def test_secret_looking_key_in_invoke_yaml_is_refused(defaults, tmp_path, key):
    defaults["backup"][key] = "hunter2-hunter2"
    with pytest.raises(ConfigError) as info:
        settings.load(defaults, environ={}, project_dir=tmp_path)
    assert info.value.what == f"invoke.yaml holds a secret at 'backup.{key}'"
    assert ".env." in info.value.hint


def test_empty_secret_looking_key_in_invoke_yaml_is_allowed(defaults, tmp_path):
    defaults["backup"]["password"] = ""
    assert settings.load(defaults, environ={}, project_dir=tmp_path).get("backup.password") == ""


# --- require ----------------------------------------------------------------


@pytest.mark.parametrize("dotted,env_var", [("app.repo", "COACHNTT_APP__REPO"), ("host", "COACHNTT_HOST")])
def test_require_missing_value_names_the_env_var_in_a_one_line_hint(defaults, tmp_path, dotted, env_var):
    s = settings.load(defaults, environ={"COACHNTT_ENV": "staging"}, project_dir=tmp_path)
    with pytest.raises(ConfigError) as info:
        s.require(dotted)
    line = info.value.one_line()
    assert "\n" not in line
    assert line.startswith(f"missing config value '{dotted}'")
    assert f"{env_var}=... in .env.staging" in line
    assert info.value.exit_code == EXIT_USAGE


def test_require_returns_a_present_value(settings):
    assert settings.require("app.dir") == "/opt/coachntt"


def test_get_walks_dotted_paths_and_falls_back_to_default(settings):
    assert settings.get("domains.api") == "api.coachntt.ai"
    assert settings.get("domains.nope", "fallback") == "fallback"
    assert settings.get("app.dir.deeper") is None


def test_env_key_spelling():
    assert settings.env_key("app.branch") == "COACHNTT_APP__BRANCH"
    assert settings.env_key("deploy_user") == "COACHNTT_DEPLOY_USER"


# --- fab and inv see the same thing -----------------------------------------


def test_fab_and_inv_resolve_the_same_settings(project_dir):
    inv_config = invoke.Config(project_location=str(project_dir))
    inv_config.load_project()
    fab_config = fabric.Config(project_location=str(project_dir))
    fab_config.load_project()
    from_inv = settings.from_context(invoke.Context(config=inv_config), environ={})
    from_fab = settings.from_context(fabric.Connection("127.0.0.1", config=fab_config), environ={})
    assert from_inv.values == from_fab.values
    assert from_inv.get("deploy_user") == "coachntt"
    assert from_inv.get("backup.db_container") == "ccp_postgres"


def test_from_context_without_coachntt_section_says_where_to_run_from():
    with pytest.raises(ConfigError) as info:
        settings.from_context(invoke.Context(config=invoke.Config()), environ={})
    assert "no 'coachntt' section" in info.value.what
    assert str(settings.PROJECT_DIR) in info.value.hint


# --- validation: one rule per setting, before any connection -------------------


def validated(defaults, tmp_path, **environ):
    return settings.validate(settings.load(defaults, environ=environ, project_dir=tmp_path))


def invoke_yaml_keys(node, path=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from invoke_yaml_keys(value, f"{path}{key}.")
        else:
            yield f"{path}{key}"


def test_every_setting_in_invoke_yaml_has_a_rule(yaml_defaults):
    """A new setting needs a rule before it can reach a server."""
    unruled = [k for k in invoke_yaml_keys(yaml_defaults)
               if k not in settings.RULES and k.rsplit(".", 1)[0] + ".*" not in settings.RULES]
    assert unruled == []


def test_the_defaults_and_the_sandbox_values_pass(defaults, tmp_path):
    s = validated(defaults, tmp_path,
                  COACHNTT_HOST="coachntt@10.201.0.11:2222",
                  COACHNTT_APP__REPO="git://10.201.0.1:9418/app",
                  COACHNTT_APP__COMPOSE_OVERRIDES="/etc/coachntt-sandbox/compose.sandbox.yml",
                  COACHNTT_APP__HEALTH_DEADLINE="20",
                  COACHNTT_APP__HOOKS__PRE_DEPLOY="./scripts/check.sh && echo \"$COACHNTT_SHA\" > /tmp/x",
                  COACHNTT_UPSTREAMS__STAGING="no-such-upstream.invalid:8001",
                  COACHNTT_FIREWALL__ALLOW="22/tcp,80/tcp,443/tcp,60000:61000/udp,OpenSSH",
                  COACHNTT_AUTHORIZED_KEYS="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDvYJdaKkBzbdPPL1ztG3Te2yRAXX4LBpQp/bxLmuVdm me@laptop",
                  COACHNTT_FAIL2BAN__MAXRETRY="5", COACHNTT_FAIL2BAN__BANTIME="1h")
    assert s.get("deploy_user") == "coachntt"


GOOD = [
    ("COACHNTT_APP__BRANCH", "release/2026-11"),
    ("COACHNTT_APP__BRANCH", "hotfix-1.2"),
    ("COACHNTT_APP__REPO", "git@github.com:coachntt/api.git"),
    ("COACHNTT_APP__REPO", "https://github.com/coachntt/api.git"),
    ("COACHNTT_APP__REPO", "/srv/git/api.git"),
    ("COACHNTT_APP__HEALTH_URL", "http://localhost:8000/health?deep=1"),
    ("COACHNTT_APP__HEALTH_URL", "https://127.0.0.1/api/health"),
    ("COACHNTT_APP__ENV_FILE", "config/.env.production"),
    ("COACHNTT_DEPLOY_GROUPS", "sudo,docker,_ops"),
    ("COACHNTT_BACKUP__DB_CONTAINER", "coachntt-postgres-1"),
    ("COACHNTT_STATE_DIR", "/srv/coachntt-ops/state"),
]


@pytest.mark.parametrize("key,value", GOOD)
def test_ordinary_values_pass(defaults, tmp_path, key, value):
    validated(defaults, tmp_path, **{key: value})


BAD = [
    ("deploy_user", "coachntt;touch /tmp/x", "a user name"),
    ("deploy_user", "Coachntt", "a user name"),
    ("deploy_user", "-rf", "a user name"),
    ("deploy_user", "a" * 33, "a user name"),
    ("deploy_groups", "sudo,docker wheel", "a list of group names"),
    ("state_dir", "relative/state", "an absolute path"),
    ("state_dir", "/", "an absolute path"),
    ("state_dir", "/var/lib/../../etc", "an absolute path"),
    ("state_dir", "/var/lib/$(id)", "an absolute path"),
    ("app.dir", "/opt/coach ntt", "an absolute path"),
    ("backup.dir", "/backups;reboot", "an absolute path"),
    ("app.branch", "main;reboot", "a git branch name"),
    ("app.branch", "-main", "a git branch name"),
    ("app.branch", "a..b", "a git branch name"),
    ("app.branch", "feature.lock", "a git branch name"),
    ("app.branch", "$(id)", "a git branch name"),
    ("app.repo", "--upload-pack=touch /tmp/x", "a git URL"),
    ("app.repo", "https://example.org/a.git;id", "a git URL"),
    ("app.repo", "github.com/coachntt/api", "a git URL"),
    ("app.compose_file", "../docker-compose.yml", "a file name inside app.dir"),
    ("app.compose_file", "-f/etc/passwd", "a file name inside app.dir"),
    ("app.compose_overrides", "ok.yml,bad file.yml", "a list of file names"),
    ("app.env_file", "/etc/shadow", "a file name inside app.dir"),
    ("app.health_url", "http://198.51.100.7:8000/health", "an http(s) URL on 127.0.0.1 or localhost"),
    ("app.health_url", "http://127.0.0.1:8000/health';id;'", "an http(s) URL on 127.0.0.1 or localhost"),
    ("app.health_url", "file:///etc/passwd", "an http(s) URL on 127.0.0.1 or localhost"),
    ("app.health_deadline", "0", "a whole number of seconds from 1 to 3600"),
    ("app.health_interval", "999", "a whole number of seconds from 1 to 60"),
    ("backup.db_container", "x$(touch /tmp/y)", "a container name"),
    ("backup.db_user", "coachntt owner", "a database user name"),
    ("backup.db_name", "x$(touch /tmp/y)", "a database name"),
    ("backup.db_name", "coachntt-prod", "a database name"),
    ("backup.keep_daily", "100000", "a whole number from 0 to 1000"),
    ("thresholds.cpu_percent_max", "101", "a whole number from 1 to 100"),
    ("firewall.allow", "22/tcp,80/tcp;ufw disable", "a list of ufw rules"),
    ("firewall.allow", "22/tcp,Nginx Full", "a list of ufw rules"),
    ("rate_limit.burst", "-1", "a whole number from 0 to 100000"),
    ("ssh.connect_timeout", "0", "a whole number of seconds from 1 to 300"),
    ("host", "deploy@bad host", "user@host[:port]"),
    ("host", "deploy@10.201.0.2:70000", "user@host[:port]"),
    ("host", "-oProxyCommand=id@x", "user@host[:port]"),
    ("authorized_keys", "ssh-ed25519 AAAA me\nssh-rsa EVIL", "a list of public key lines"),
    ("fail2ban.bantime", "1h; ignoreip = 0.0.0.0/0", "a fail2ban duration"),
    ("fail2ban.maxretry", "lots", "a whole number from 1 to 100"),
]


@pytest.mark.parametrize("dotted,value,expected", BAD)
def test_a_bad_value_is_refused_naming_setting_expectation_and_value(defaults, tmp_path, dotted, value, expected):
    key = settings.env_key(dotted)
    try:
        s = settings.load(defaults, environ={key: value}, project_dir=tmp_path)
    except ConfigError as error:  # a number setting refuses a non-number while loading
        assert error.what == f"{key} must be a number, got '{value}'"
        return
    with pytest.raises(ConfigError) as info:
        settings.validate(s)
    line = info.value.one_line()
    assert line.startswith(f"{dotted} must be {expected}"), line
    assert "got '" in line and "\n" not in line
    assert info.value.hint == f"fix {key} in the environment"
    assert info.value.exit_code == EXIT_USAGE


def test_the_message_quotes_the_value_given(defaults, tmp_path):
    with pytest.raises(ConfigError) as info:
        validated(defaults, tmp_path, COACHNTT_DEPLOY_USER="coachntt;touch /tmp/x")
    assert info.value.one_line() == (
        "deploy_user must be a user name (a-z, 0-9, _ -; at most 32, not starting with a digit or -), "
        "got 'coachntt;touch /tmp/x'; fix COACHNTT_DEPLOY_USER in the environment"
    )


def test_the_hint_names_the_env_file_or_invoke_yaml_the_value_came_from(defaults, tmp_path):
    write_env(tmp_path, "COACHNTT_APP__BRANCH=bad branch\n")
    with pytest.raises(ConfigError) as info:
        validated(defaults, tmp_path)
    assert info.value.hint == "fix COACHNTT_APP__BRANCH in .env.production"

    defaults["backup"]["db_name"] = "bad name"
    with pytest.raises(ConfigError) as info:
        validated(defaults, tmp_path / "nowhere")
    assert info.value.hint == "fix backup.db_name in invoke.yaml, or set COACHNTT_BACKUP__DB_NAME=... in .env.production"


def test_a_value_of_the_wrong_type_in_invoke_yaml_is_refused(defaults, tmp_path):
    defaults["deploy_groups"] = "sudo"
    with pytest.raises(ConfigError, match="^deploy_groups must be a list of group names"):
        validated(defaults, tmp_path)
    defaults["deploy_groups"] = ["sudo"]
    defaults["app"]["health_deadline"] = True
    with pytest.raises(ConfigError, match="^app.health_deadline must be a whole number"):
        validated(defaults, tmp_path)


def test_a_hostile_value_is_shown_on_one_line_and_cut_short(defaults, tmp_path):
    with pytest.raises(ConfigError) as info:
        validated(defaults, tmp_path, COACHNTT_DEPLOY_USER="x\n\x1b[31mred" + "y" * 10_000)
    line = info.value.one_line()
    assert "\n" not in line and "\x1b" not in line and len(line) < 300
    assert "got 'x\\n\\x1b[31mred" in line and "...'" in line


def test_from_context_validates(project_dir, monkeypatch):
    config = invoke.Config(project_location=str(project_dir))
    config.load_project()
    with pytest.raises(ConfigError, match="^backup.db_name must be"):
        settings.from_context(invoke.Context(config=config), environ={"COACHNTT_BACKUP__DB_NAME": "x$(touch /tmp/y)"})
