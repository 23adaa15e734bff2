"""The auth file is read strictly: a string where a list belongs, or a key listed twice, is an
error naming the field, never a silent grant."""

import pytest

from shardserve.api.auth import Auth, hash_key

A, B = hash_key("key-a"), hash_key("key-b")


@pytest.mark.parametrize("text,error", [
    (f"tenants:\n  acme: {{keys: [{A}], models: llama}}\n", "tenants.acme.models must be a list"),
    (f"tenants:\n  acme: {{keys: {A}, models: [llama]}}\n", "tenants.acme.keys must be a list"),
    (f"admin_keys: {A}\n", "admin_keys must be a list"),
    (f"admin_keys: [{A}]\ntenants:\n  acme: {{keys: [{A}], models: [x]}}\n", "listed twice"),
    (f"tenants:\n  a: {{keys: [{B}], models: [x]}}\n  b: {{keys: [{B}], models: [y]}}\n",
     "listed twice"),
    ("admin_keys: [sha256:XYZ]\n", "sha256:<64 hex digits>"),
    (f"tenants: [{A}]\n", "tenants must be a mapping"),
])
def test_bad_auth_files_are_refused(tmp_path, text, error):
    path = tmp_path / "auth.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=error):
        Auth.from_file(str(path))


def test_models_and_wildcards(tmp_path):
    path = tmp_path / "auth.yaml"
    path.write_text(f"admin_keys: [{A}]\ntenants:\n  acme: {{keys: [{B}], models: [llama]}}\n"
                    f"  all: {{keys: [{hash_key('key-c')}], models: '*'}}\n")
    auth = Auth.from_file(str(path))
    acme = auth.identify("key-b")
    assert acme.tenant == "acme" and acme.may_use("llama") and not acme.may_use("l")
    assert auth.identify("key-a").admin and auth.identify("key-c").may_use("anything")
    assert auth.identify("key-d") is None
