"""household: the ALFWorld-style text world (generation, dynamics, rewards, expert, splits)."""
import random
from collections import Counter

import pytest

import household as H

TASKS = H.load_tasks("train", 250) + H.load_tasks("test", 250)  # every family x level, both splits


def wrap(action: str) -> str:
    return f"<think>I should do this.</think><action>{action}</action>"


def first_task(family: str, level: int = 1) -> dict:
    return next(t for t in TASKS if t["family"] == family and t["level"] == level)


def test_mix_covers_every_family_and_level():
    assert Counter((t["family"], t["level"]) for t in TASKS[:180]) == {(f, l): 10 for f in H.FAMILIES for l in H.LEVELS}
    assert len({t["id"] for t in TASKS}) == 500


def test_expert_solves_every_task_through_step_within_the_cap():
    lengths = []
    for task in TASKS:
        env = H.HouseholdEnv()
        env.reset(task)
        for a in env.expert(task):
            assert not env.done
            obs, done, info = env.step(wrap(a))
            assert not info["invalid"], (task["id"], a, obs)
        assert done and env.success and env.reward == 10.0 and env.n_invalid == 0, task["id"]
        assert env.n_steps <= env.max_steps == 50
        lengths.append(env.n_steps)
    print(f"\nexpert: 500/500 solved, mean {sum(lengths) / len(lengths):.1f} steps, max {max(lengths)}")


def test_random_admissible_policy_rarely_succeeds():
    rng, wins, obs_len = random.Random(0), Counter(), []
    tasks = TASKS[:100] + TASKS[250:350]
    for task in tasks:
        env = H.HouseholdEnv()
        env.reset(task)
        done = False
        while not done:
            obs, done, info = env.step(wrap(rng.choice(env.admissible_actions())))
            assert not info["invalid"], obs  # every listed action is accepted
            obs_len.append(len(obs))
        wins[task["level"]] += env.success
        assert env.success or (env.n_steps == 50 and info["truncated"])
    rate = sum(wins.values()) / len(tasks)
    print(f"\nrandom admissible policy: success {rate:.1%} over {len(tasks)} tasks, by level {dict(wins)}; "
          f"observation chars mean {sum(obs_len) / len(obs_len):.0f} max {max(obs_len)}")
    assert rate < 0.10
    assert max(obs_len) < 1500  # observations stay compact: current location + admissible actions


def test_invalid_and_unparsable_actions():
    env = H.HouseholdEnv()
    msgs = env.reset(first_task("pick"))
    assert [m["role"] for m in msgs] == ["system", "user"] and "<action>" in msgs[0]["content"]
    assert msgs[1]["content"].startswith("Your task is to: ") and "Admissible actions: go to " in msgs[1]["content"]
    obs, done, info = env.step("<think>no action here</think>")
    assert obs.startswith("Nothing happens.\nAdmissible actions: ") and not done
    assert info["void"] and info["invalid"] and env.void and env.n_invalid == 1 and env.reward == pytest.approx(-0.1)
    obs, done, info = env.step(wrap("fly to the moon"))
    assert obs.startswith("Nothing happens.") and info["invalid"] and not info["void"] and not env.void
    assert env.n_invalid == 2 and env.reward == pytest.approx(-0.2) and env.n_steps == 2 and env.n_tool_calls == 1
    obs, done, info = env.step(wrap("take mug 99 from countertop 1"))  # well-formed but not admissible
    assert obs.startswith("Nothing happens.") and env.n_invalid == 3 and env.reward == pytest.approx(-0.3)
    # the LAST <action> counts; tags are case-insensitive; case and spaces are normalized
    obs, done, info = env.step("<action>fly</action> no wait <ACTION>  INVENTORY </Action>")
    assert obs.startswith("You are not carrying anything.") and not info["invalid"] and env.n_invalid == 3


def test_put_accepts_in_on_and_alfworlds_literal_in_on():
    task = first_task("pick")
    acts = H.expert(task)
    put = acts[-1]
    assert put.startswith("put ")
    obj, rec = put[4:].replace(" on ", " in ").split(" in ")
    for variant in (f"put {obj} in/on {rec}", f"put {obj} in {rec}", f"put {obj} on {rec}"):
        env = H.HouseholdEnv()
        env.reset(task)
        for a in acts[:-1]:
            env.step(wrap(a))
        obs, done, info = env.step(wrap(variant))
        assert done and env.success and obs == f"You put the {obj} in/on the {rec}."


@pytest.mark.parametrize("family", ["clean", "heat", "cool"])
def test_untreated_object_in_the_goal_receptacle_does_not_count(family):
    """Skipping the clean/heat/cool step leaves every other action valid but the goal unmet."""
    for level in H.LEVELS:
        task = first_task(family, level)
        acts = H.expert(task)
        i = next(k for k, a in enumerate(acts) if a.startswith(family + " "))
        env = H.HouseholdEnv()
        env.reset(task)
        for a in acts[:i] + acts[i + 1:]:  # the same plan without the treatment
            obs, done, info = env.step(wrap(a))
            assert not info["invalid"], (a, obs)
        assert not env.success and not done and env.reward == 0.0


def test_pick_two_needs_two_and_look_needs_the_lamp_on():
    task = first_task("pick_two")
    acts = H.expert(task)
    env = H.HouseholdEnv()
    env.reset(task)
    first_put = next(k for k, a in enumerate(acts) if a.startswith("put "))
    for a in acts[:first_put + 1]:
        env.step(wrap(a))
    assert not env.success and not env.done  # one object placed is not enough
    task = first_task("look")
    acts = H.expert(task)
    assert acts[-1].startswith("use ") and acts[-1].split()[1] == task["goal"].split()[-1].rstrip(".")
    env = H.HouseholdEnv()
    env.reset(task)
    for a in acts[:-1]:
        env.step(wrap(a))
    assert not env.success  # holding the object next to the lamp, lamp still off
    env.step(wrap(acts[-1]))
    assert env.success and env.reward == 10.0


def test_step_cap_ends_the_episode_and_counters():
    env = H.HouseholdEnv(max_steps=12)
    env.reset(first_task("pick_two", 3))
    for k in range(1, 13):
        assert env.toolcall_bonus() == pytest.approx(min(1.0, 0.1 * (k - 1)))
        obs, done, info = env.step(wrap("look"))
        assert done == (k == 12) and info["truncated"] == (k == 12)
    assert env.n_steps == 12 and env.toolcall_bonus() == 1.0 and not env.success and env.reward == 0.0
    with pytest.raises(RuntimeError, match="reset"):
        env.step(wrap("look"))
    with pytest.raises(ValueError, match="max_steps"):
        H.HouseholdEnv(max_steps=0)


def test_stop_strings():
    env = H.HouseholdEnv()
    assert env.stop_strings == ("</action>",) and env.name == "household"
    assert env.is_stop("<think>x</think><action>look</action>") and env.is_stop("<action>look</ACTION>\n")
    assert not env.is_stop("<think>x</think><action>look") and not env.is_stop("<action>look</action> and")


def test_generation_is_deterministic():
    again = H.load_tasks("train", 60)
    assert again == TASKS[:60]
    for t in again[:12]:
        w1 = H.generate_world(t["world_seed"], t["family"], t["level"])
        assert H.world_signature(w1) == H.world_signature(H.generate_world(t["world_seed"], t["family"], t["level"]))
        assert H.HouseholdEnv().reset(t) == H.HouseholdEnv().reset(dict(t))
    assert H.load_tasks("train", 5, seed=1)[0]["id"] == "household/train/s1/0"
    assert H.load_tasks("train", 5, seed=1)[0]["world_seed"] != TASKS[0]["world_seed"]
    assert H.stable_seed("household", 0, 0, 0) == 496022437838195582  # sha256, not the salted hash()


def test_train_and_test_are_disjoint():
    sig = {}
    for t in TASKS:
        s = H.world_signature(H.generate_world(t["world_seed"], t["family"], t["level"]))
        sig.setdefault(t["split"], set()).add(s)
    assert len(sig["train"]) == len(sig["test"]) == 250  # also: no duplicates within a split
    assert not sig["train"] & sig["test"]
    with pytest.raises(ValueError, match="split"):
        H.load_tasks("val", 3)
