"""Print gradio's own requirements for this machine, one per line, without Pillow (used by the Makefile).

gradio declares `pillow<13` but runs on the pinned Pillow 13 (`constraints.txt`), and pip cannot override one
requirement of a package. So `make install` puts gradio in with `--no-deps` and then installs what this prints under
the project's pins: everything gradio needs, and the pinned Pillow stays. Run after gradio is installed:
`python -m transformers_bard.app.gradio_requirements`.
"""

from importlib.metadata import requires

from packaging.requirements import Requirement


def gradio_requirements() -> list[str]:
    """gradio's requirements whose markers hold here, as `name[extras]specifier`, Pillow left out."""
    out = []
    for requirement in map(Requirement, requires("gradio") or []):
        if requirement.name.lower() == "pillow":
            continue
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        extras = f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else ""
        out.append(f"{requirement.name}{extras}{requirement.specifier}")
    return out


if __name__ == "__main__":
    print("\n".join(gradio_requirements()))
