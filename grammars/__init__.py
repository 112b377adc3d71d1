"""The .nest grammar, shipped inside the wheel as `nestc.grammars/nest.lark`."""
