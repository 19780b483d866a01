#!/usr/bin/env python3
"""What the boot check needs from labbook's services, and their clean-up.

  labdata.py fetch BOOKING_ID STATUS_JSON OUTDIR
      For each instance of the booking (from `labbook status BOOKING_ID --json`): its
      user-data as EC2 returns it (moto: DescribeInstanceAttribute userData), a NoCloud
      meta-data, and the logins labbook emailed for it (trainee passwords from the confirmation
      email, the admin's from the instance-details email), in OUTDIR/slot-N/:
        user-data, meta-data, instance-id,
        logins    one "ROLE USERNAME PASSWORD" line each (ROLE: admin or trainee)
        hashes    one "USERNAME HASH" line per account of the user-data

  labdata.py cleanup [--instance ID]... [--booking BOOKING_ID]... [--security-group NAME]
      Terminates the instances in moto, deletes the booking's emails from maildev and the
      (empty) security group: what the check made, nothing else.

Talks to moto (MOTO_PORT, 5000) and maildev (MAILDEV_WEB_PORT, 1080) on 127.0.0.1 only.
"""

import argparse
import base64
import json
import os
import re
import sys
import urllib.request

import boto3
import yaml

MOTO = f"http://127.0.0.1:{os.environ.get('MOTO_PORT', '5000')}"
INBOX = f"http://127.0.0.1:{os.environ.get('MAILDEV_WEB_PORT', '1080')}"


def ec2():
    return boto3.client(
        "ec2",
        endpoint_url=MOTO,
        region_name="us-east-1",
        aws_access_key_id="boot-check",
        aws_secret_access_key="boot-check",
    )


def emails(booking_id):
    """maildev's emails of this booking (maildev 2.2 lists them at /email)."""
    with urllib.request.urlopen(f"{INBOX}/email", timeout=10) as r:
        mails = json.load(r)
    want = f"Booking ID: {booking_id}\n"
    return [m for m in mails if want in (m.get("text") or "").replace("\r\n", "\n")]


def one_email(mails, subjects):
    found = [m for m in mails if m.get("subject") in subjects]
    if len(found) != 1:
        sys.exit(f"labdata: expected one email with subject {subjects}, found {len(found)}")
    return found[0]["text"].replace("\r\n", "\n")


def trainee_passwords(confirmation):
    pairs = re.findall(r"^Username: (\S+), Password: (\S+)$", confirmation, re.M)
    if not pairs:
        sys.exit("labdata: no 'Username: ..., Password: ...' line in the confirmation email")
    return dict(pairs)


def machines(details):
    """The instance-details email's machines: trainee usernames and the admin's login."""
    out = []
    for block in re.split(r"^Instance URL: ", details, flags=re.M)[1:]:
        users = re.findall(r"^- (\S+)$", block, re.M)
        admin = re.search(r"^Username: (\S+)\nPassword: (\S+)$", block, re.M)
        if not admin:
            sys.exit("labdata: an instance in the instance-details email has no admin login")
        out.append({"users": users, "admin": admin.groups()})
    return out


def fetch(args):
    with open(args.status) as f:
        status = json.load(f)
    mails = emails(args.booking_id)
    passwords = trainee_passwords(one_email(mails, {"Booking Confirmation"}))
    details = machines(
        one_email(mails, {"Lab Access Information", "JupyterHub Access Information"})
    )
    client = ec2()
    for inst in status["instances"]:
        slot, instance_id, users = inst["slot"], inst["instance_id"], inst["usernames"]
        machine = [m for m in details if sorted(m["users"]) == sorted(users)]
        if len(machine) != 1:
            sys.exit(f"labdata: slot {slot} ({users}) is not one machine of the email")
        attr = client.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
        user_data = base64.b64decode(attr["UserData"]["Value"]).decode()
        out = os.path.join(args.outdir, f"slot-{slot}")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "user-data"), "w") as f:
            f.write(user_data)
        with open(os.path.join(out, "meta-data"), "w") as f:
            f.write(f"instance-id: {instance_id}\nlocal-hostname: lab-{slot}\n")
        with open(os.path.join(out, "instance-id"), "w") as f:
            f.write(instance_id + "\n")
        admin, admin_password = machine[0]["admin"]
        # Every process on an instance can read its user-data: no password may be in it.
        for secret in [admin_password, *passwords.values()]:
            if secret in user_data:
                sys.exit(f"labdata: slot {slot}'s user-data holds an emailed password")
        with open(os.path.join(out, "logins"), "w") as f:
            f.write(f"admin {admin} {admin_password}\n")
            for u in users:
                f.write(f"trainee {u} {passwords[u]}\n")
        config = yaml.safe_load(user_data)
        with open(os.path.join(out, "hashes"), "w") as f:
            for u in config["users"]:
                if isinstance(u, dict):
                    f.write(f"{u['name']} {u['passwd']}\n")
        print(f"slot {slot}: {instance_id}, {len(user_data)} bytes of user-data, "
              f"admin {admin}, trainees {' '.join(users)}")


def cleanup(args):
    client = ec2()
    if args.instance:
        client.terminate_instances(InstanceIds=args.instance)
    for name in args.security_group:
        groups = client.describe_security_groups(
            Filters=[{"Name": "group-name", "Values": [name]}]
        )["SecurityGroups"]
        for g in groups:
            try:
                client.delete_security_group(GroupId=g["GroupId"])
            except client.exceptions.ClientError as e:
                print(f"labdata: security group {name} left: {e}", file=sys.stderr)
    for booking_id in args.booking:
        for m in emails(booking_id):
            req = urllib.request.Request(f"{INBOX}/email/{m['id']}", method="DELETE")
            urllib.request.urlopen(req, timeout=10).close()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch")
    f.add_argument("booking_id")
    f.add_argument("status")
    f.add_argument("outdir")
    c = sub.add_parser("cleanup")
    c.add_argument("--instance", action="append", default=[])
    c.add_argument("--booking", action="append", default=[])
    c.add_argument("--security-group", action="append", default=[])
    args = p.parse_args()
    fetch(args) if args.cmd == "fetch" else cleanup(args)


if __name__ == "__main__":
    main()
