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
