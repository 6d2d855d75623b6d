"""NOTIFIER_CHANNELS_FILE: validated at start-up with one line per mistake (file, channel,
key), and routes may only name channels that exist (issue 11)."""

from __future__ import annotations

import pytest

from tests.support.helpers import settings_for
from tests.support.list_channel import ListChannel, ListChannelSettings
from worker.channels.registry import load_channels
from worker.core import build_core
from worker.settings import SettingsError


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('[[channel]]\ntype = "wecom"\n', "name: give it a name"),
        ('[[channel]]\nname = "email"\ntype = "wecom"\n', "is the e-mail channel's"),
        ('[[channel]]\nname = "d"\n', "type: give one of wecom, dingtalk"),
        ('[[channel]]\nname = "d"\ntype = "pager"\n', "unknown type 'pager'; known: wecom"),
        (
            '[[channel]]\nname = "d"\ntype = "x"\n[[channel]]\nname = "d"\ntype = "x"\n',
            "two channels named 'd'",
        ),
        ('[[channel]\nname = "d"\n', "not valid TOML at line 1"),
    ],
)
def test_a_mistake_is_one_line_naming_the_file_and_the_channel(tmp_path, text, says):
    path = tmp_path / "channels.toml"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        load_channels(path)
    line = str(info.value)
    assert "\n" not in line and line.startswith(f"NOTIFIER_CHANNELS_FILE={path}")
    assert says in line


def test_routes_may_name_only_channels_that_exist(tmp_path, redis_url):
    routes = tmp_path / "routes.toml"
    routes.write_text('[[route]]\nseverity = "critical"\nchannels = ["email", "dsek"]\n')
    settings = settings_for(redis_url, routes_file=routes)
    desk = ListChannel(ListChannelSettings(name="desk"), priority=0)
    with pytest.raises(SettingsError) as info:
        build_core(settings, extra_channels=[desk])
    assert "no channel named 'dsek'; known: desk, email" in str(info.value)
    routes.write_text('[[route]]\nseverity = "critical"\nchannels = ["email", "desk"]\n')
    core = build_core(settings_for(redis_url, routes_file=routes), extra_channels=[desk])
    assert [c.name for c in core.others] == ["desk"]
