"""The commands users run (`python launch/NAME.py`, `deepspeed launch/uptrain.py`): each parses its flags
and calls one function of megatron_mlkv. A package so that tests import them (`from launch import uptrain`)."""
