"""Drive a real Label Studio (its Django app in this process, SQLite in a temporary folder, no server, no
network) through the hand-off the review guide describes, for tests/test_review_label_studio.py.

    python label_studio_roundtrip.py PACK DOCUMENT_ROOT IMAGE_FOLDER WORK DECISIONS.json

Run by an interpreter that has the `label-studio` package (it need not have irank). With
LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true and LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=DOCUMENT_ROOT it creates
a project from PACK/label-studio.xml, imports PACK/label-studio.json, adds a Local Files source storage on
IMAGE_FOLDER (a folder under DOCUMENT_ROOT: Label Studio refuses the root itself) without syncing it, fetches
every task's image through its URL, annotates the tasks DECISIONS names ({irank_id: class name or "remove"}),
and writes the project's JSON export to WORK/export.json. Prints one line, IRANK-REPORT and a JSON object: what
each step gave. No connection leaves the machine: Label Studio's update check is off, and any attempt to
connect elsewhere is refused and reported.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

NETWORK_ATTEMPTS: list[str] = []


def refuse_network() -> None:
    """Refuse every connection to anything but this machine (the test runs with no network), noting each try."""
    import socket

    connect = socket.socket.connect

    def local_only(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in ("127.0.0.1", "::1", "localhost") and not host.startswith("/"):
            NETWORK_ATTEMPTS.append(str(address))
            raise OSError(f"irank test: no network ({address})")
        return connect(self, address)

    socket.socket.connect = local_only


def setup(work: Path, document_root: Path) -> None:
    os.environ.update({
        "LABEL_STUDIO_BASE_DATA_DIR": str(work / "label-studio-data"),
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(document_root),
        "LABEL_STUDIO_LATEST_VERSION_CHECK": "false",
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
        "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "", "COLLECT_ANALYTICS": "false",
    })
    refuse_network()
    import label_studio

    sys.path.insert(0, str(Path(label_studio.__file__).parent))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "label_studio.core.settings.label_studio")
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", "--no-color", verbosity=0)


def client_for_new_user():
    from organizations.models import Organization
    from rest_framework.test import APIClient
    from users.models import User

    user = User.objects.create_user(email="irank-test@localhost", password="irank-test-password")
    organization = Organization.create_organization(created_by=user, title="irank test")
    user.active_organization = organization
    user.save(update_fields=["active_organization"])
    client = APIClient()
    client.force_authenticate(user=user)  # the API
    client.force_login(user)  # /data/local-files/, a plain Django view
    return client


def annotation(task: dict, choice: str, config_names: dict) -> dict:
    """An annotation as Label Studio's editor saves one for this config: the class, or the remove choice."""
    if choice == "remove":
        from_name, value = config_names["decision"], config_names["remove"]
    else:
        from_name, value = config_names["label"], choice
    return {"result": [{"from_name": from_name, "to_name": "image", "type": "choices", "value": {"choices": [value]}}],
            "task": task["id"]}


def main(pack: Path, document_root: Path, image_folder: Path, work: Path, decisions: dict) -> dict:
    setup(work, document_root)
    client = client_for_new_user()
    report: dict = {}
    created = client.post("/api/projects/", {"title": "irank review", "label_config": (pack / "label-studio.xml").read_text()},
                          format="json")
    report["create_project"] = created.status_code
    if created.status_code != 201:
        return {**report, "error": created.content.decode("utf-8", "replace")[:2000]}
    project = created.json()["id"]
    tasks = json.loads((pack / "label-studio.json").read_text())
    imported = client.post(f"/api/projects/{project}/import", tasks, format="json")
    report["import"] = [imported.status_code, imported.json()]
    storage = client.post("/api/storages/localfiles", {"project": project, "title": "irank images", "path": str(image_folder),
                                                       "use_blob_urls": True, "regex_filter": ""}, format="json")
    report["storage"] = [storage.status_code, storage.json() if storage.status_code >= 400 else None]
    listed = client.get(f"/api/tasks?project={project}&page_size=1000&fields=all").json()
    stored = listed["tasks"] if isinstance(listed, dict) else listed
    report["tasks"] = len(stored)
    report["predictions"] = sum(len(task.get("predictions") or []) for task in stored)
    images = {}
    for task in stored:
        response = client.get(task["data"]["image"])
        body = b"".join(response.streaming_content) if response.streaming else response.content
        images[task["data"]["irank_id"]] = [response.status_code, body.hex()]
    report["images"] = images
    names = {"label": "label", "decision": "irank_decision", "remove": "remove from the data set"}
    for task in stored:
        choice = decisions.get(task["data"]["irank_id"])
        if choice is not None:
            saved = client.post(f"/api/tasks/{task['id']}/annotations", annotation(task, choice, names), format="json")
            report.setdefault("annotations", []).append(saved.status_code)
    exported = client.get(f"/api/projects/{project}/export?exportType=JSON")
    report["export"] = exported.status_code
    body = b"".join(exported.streaming_content) if getattr(exported, "streaming", False) else exported.content
    (work / "export.json").write_bytes(body)
    report["network_attempts"] = NETWORK_ATTEMPTS
    return report


if __name__ == "__main__":
    pack_dir, root, folder, work_dir, decisions_file = map(Path, sys.argv[1:6])
    result = main(pack_dir, root.resolve(), folder.resolve(), work_dir, json.loads(decisions_file.read_text()))
    print("IRANK-REPORT " + json.dumps(result))
