"""The dcrouter command's route explanations, on the annotated example."""

from __future__ import annotations

from pathlib import Path

import pytest

from dcrouter.cli import main

EXAMPLE = str(Path(__file__).parents[2] / "conf" / "dcrouter.ini")


@pytest.mark.parametrize(("args", "says"), [
    (["example.com", "80", "/api/v1"], "[route:example-api] action http"),
    (["example.com", "80", "/admin/x"], "[route:example-admin]"),
    (["example.com", "80", "/admin"], "301 to the path with a / added, which [route:example-admin]"),
    (["www.example.com", "80"], "[route:example-web]"),
    (["old.example.com", "80"], "[route:example-to-https] action redirect"),
    (["a.example.com", "443"], "[route:example-passthrough] action forward"),
    (["nowhere.test", "80"], "no route; the answer is 404"),
    (["x", "1"], "nothing listens on port 1"),
])
def test_explain(capsys, args, says):
    main(["routes", EXAMPLE, "--explain", *args])
    assert says in capsys.readouterr().out


def test_explain_by_client_address(capsys):
    main(["routes", EXAMPLE, "--explain", "h.test", "8080", "--client", "192.0.2.9"])
    assert "[route:example-block]" in capsys.readouterr().out


def test_queue_without_a_running_daemon_names_the_socket(tmp_path):
    path = tmp_path / "dcrouter.ini"
    path.write_text("[route:web]\nports = 80\n")
    with pytest.raises(SystemExit) as caught:
        main(["queue", str(path)])
    assert str(caught.value).startswith(f"cannot reach the daemon at {tmp_path}/state/admin.sock:")


def test_certs_with_the_socket_off_needs_user(tmp_path):
    path = tmp_path / "dcrouter.ini"
    path.write_text("[admin]\nsocket = off\n[route:web]\nports = 80\n")
    with pytest.raises(SystemExit) as caught:
        main(["certs", str(path)])
    assert "[admin] socket = off: ask over [admin] listen with --user" in str(caught.value)


def test_checkconfig_prints_warnings_and_still_passes(tmp_path, capsys):
    """An HS256 secret every user can read: said with its line; the file is usable."""
    secret = tmp_path / "jwt.secret"
    secret.write_bytes(b"s" * 32)
    secret.chmod(0o644)
    path = tmp_path / "dcrouter.ini"
    path.write_text(
        f"[dcrouter]\nstate_dir = {tmp_path / 'state'}\n"
        "[route:api]\nports = 8080\naction = static\nbody = ok\nauth = jwt\n"
        f"jwt_key = {secret}\njwt_algorithms = HS256\n"
    )
    assert main(["checkconfig", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == [
        f"warning: {path}:8: [route:api] jwt_key: {secret} holds a secret and every user can"
        f" read it (mode 0644); chmod o-r {secret}"
    ]
    assert out == f"{path}: OK, 1 route(s) on 1 port(s), 1 listener(s), 1 warning(s)\n"
    secret.chmod(0o600)
    assert main(["checkconfig", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.endswith("1 listener(s)\n")


def test_checkconfig_warns_of_routes_that_never_match(tmp_path, capsys):
    """Same port, same match, later: dead (nginx's "conflicting server name")."""
    path = tmp_path / "dcrouter.ini"
    path.write_text(
        f"[dcrouter]\nstate_dir = {tmp_path / 'state'}\n"
        "[route:a]\nports = 8000\naction = static\nbody = a\n"
        "[route:b]\nports = 8000\naction = static\nbody = b\n"
        "[route:c]\nports = 8000\ndomains = c.test\naction = static\nbody = c\n"
        "[route:mail-clash]\nports = 2525\naction = static\nbody = x\n"
        "[email]\nhostname = mx.example.com\nports = 2525\ndefault_mode = reject\n"
    )
    assert main(["checkconfig", str(path)]) == 0
    assert capsys.readouterr().err.splitlines() == [
        f"warning: {path}:8: [route:b] ports: never matches on port 8000: [route:a] matches"
        " the same connections and comes first",
        f"warning: {path}:17: [route:mail-clash] ports: takes every connection of the mail"
        " server's port 2525 ([email] ports): give it other domains or another port",
    ]


def test_checkconfig_names_a_header_edit_it_refuses(tmp_path, capsys):
    path = tmp_path / "dcrouter.ini"
    path.write_text(
        f"[dcrouter]\nstate_dir = {tmp_path / 'state'}\n"
        "[route:web]\nports = 8080\naction = http\ntarget = 127.0.0.1:9\n"
        "request_headers =\n    X-Env: prod\n    -Host\n"
        "response_headers = Strict-Transport-Security: max-age=63072000\n"
    )
    assert main(["checkconfig", str(path)]) == 1
    out, err = capsys.readouterr()
    assert f"{path}:7: [route:web] request_headers: Host cannot be set or removed here" in err
    assert "response_headers" not in err


@pytest.mark.parametrize(("args", "says"), [
    (["h.test", "80", "--client", "notanip"], "--client 'notanip' is not an IP address"),
    (["a..b", "80"], "--explain 'a..b' is not a host name"),
    (["example.com", "80", "/\u65e5\u672c"],
     "--explain path '/\u65e5\u672c' is not as a request sends it: percent-encode it"
     " (/%E6%97%A5%E6%9C%AC)"),
])
def test_explain_with_what_no_request_has_is_a_one_line_error(capsys, args, says):
    """They ended in a traceback."""
    assert main(["routes", EXAMPLE, "--explain", *args]) == 2
    assert capsys.readouterr().err == f"dcrouter routes: {says}\n"


def test_checkconfig_names_the_email_ports_line_for_a_mail_route_clash(tmp_path, capsys):
    path = tmp_path / "dcrouter.ini"
    path.write_text(
        f"[dcrouter]\nstate_dir = {tmp_path / 'state'}\n"
        "[email]\nhostname = mx.example.com\nports = 2525\ndefault_mode = reject\n"
        "[route:x]\nports = 2525\nbind = 127.0.0.1\naction = static\nbody = x\n"
    )
    assert main(["checkconfig", str(path)]) == 1
    assert capsys.readouterr().err.startswith(f"{path}:5: [route:email-2525] ports: port 2525")


def test_checkconfig_warns_of_caps_the_workers_round_up(tmp_path, capsys):
    path = tmp_path / "dcrouter.ini"
    path.write_text(
        f"[dcrouter]\nstate_dir = {tmp_path / 'state'}\nworkers = 8\n"
        "[defaults]\nmax_connections = 1000\n"
        "[route:a]\nports = 8000\naction = static\nbody = a\nmax_connections = 1\n"
    )
    assert main(["checkconfig", str(path)]) == 0
    assert capsys.readouterr().err.splitlines() == [
        f"warning: {path}:10: [route:a] max_connections: 1 split between 8 workers, each"
        " allowed 1: up to 8 in all (workers = 1 keeps it exact)"
    ]


def test_checkconfig_warns_of_an_admin_listener_off_loopback(tmp_path, capsys):
    from dcrouter.auth.passwords import hashPassword

    path = tmp_path / "dcrouter.ini"
    path.write_text(
        f"[dcrouter]\nstate_dir = {tmp_path / 'state'}\n"
        "[route:a]\nports = 8000\naction = static\nbody = a\n"
        f"[admin]\nlisten = 0.0.0.0:9900\nusers = ops:{hashPassword('pw', cost=4)}\n"
    )
    assert main(["checkconfig", str(path)]) == 0
    (warning,) = capsys.readouterr().err.splitlines()
    assert warning.startswith(f"warning: {path}:8: [admin] listen: the admin listener on"
                              " 0.0.0.0:9900 is plain HTTP")
