"""phasecast.sqlalchemy against a real table, with snapshots from a real
agent before and after the contract flip."""

import unittest

import harness
from harness import Env

from sqlalchemy import Column, Integer, MetaData, Text, create_engine, event, insert, select, text, update
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.orm import Session, declarative_base

from phasecast import Agent
from phasecast.sqlalchemy import (INFO_KEY, TableRemoved, engine_url, query_options, removed_in, writable,
                                  writable_columns)


def model(app_schema):
    Base = declarative_base(metadata=MetaData(schema=app_schema))

    class Instance(Base):
        __tablename__ = "instances"
        id = Column(Integer, primary_key=True)
        name = removed_in("L", Column(Text))
        display_name = removed_in("L", Column(Text))
        common_name = Column(Text)

    return Instance


class SQLAlchemyTest(unittest.TestCase):
    def test_options_follow_the_snapshot(self):
        env = Env(self)
        env.release()
        a = Agent(env.config())
        a.start(timeout=20)
        self.addCleanup(a.stop, 1.0)
        Instance = model(env.app)
        self.assertEqual(Instance.__table__.c.name.info[INFO_KEY], "L")

        url = engine_url(harness.DATABASE_URL.replace("postgres://", "postgresql+psycopg2://"), a)
        self.assertIn("application_name=phasecast", url)
        engine = create_engine(url)
        self.addCleanup(engine.dispose)
        statements = []
        event.listen(engine, "before_cursor_execute", lambda c, cur, stmt, *rest: statements.append(stmt))

        with engine.connect() as conn:
            self.assertEqual(conn.execute(text("SELECT current_setting('application_name')")).scalar(),
                             a.application_name)

        # Before contract: everything is loaded and written.
        with a.guard() as snap, Session(engine) as s:
            self.assertEqual(query_options(snap, Instance), [])
            row = {"id": 1, "name": "n1", "display_name": "d1", "common_name": "c1"}
            self.assertEqual(writable(snap, Instance, row), row)
            s.execute(insert(Instance).values(**writable(snap, Instance, row)))
            s.commit()
            got = s.query(Instance).options(*query_options(snap, Instance)).one()
            self.assertEqual(got.name, "n1")

        env.flip("L", "migrate")
        env.flip("L", "contract")
        epoch = env.epoch()
        harness.wait_for(lambda: a.snapshot().epoch == epoch, what="the contract flip")

        with a.guard() as snap, Session(engine) as s:
            self.assertEqual(writable_columns(snap, Instance), {"id", "common_name"})
            row = {"id": 2, "name": "n2", "display_name": "d2", "common_name": "c2"}
            self.assertEqual(writable(snap, Instance, row), {"id": 2, "common_name": "c2"})
            statements.clear()
            s.execute(insert(Instance).values(**writable(snap, Instance, row)))
            s.execute(update(Instance).where(Instance.id == 1)
                      .values(**writable(snap, Instance, {"name": "x", "common_name": "c1b"})))
            s.commit()
            q = s.query(Instance).options(*query_options(snap, Instance)).order_by(Instance.id)
            rows = q.all()
            s2 = select(Instance).options(*query_options(snap, Instance)).order_by(Instance.id)
            rows2 = s.execute(s2).scalars().all()
            for stmt in statements:
                self.assertNotIn("display_name", stmt)
                self.assertNotIn(".name", stmt)
            self.assertEqual([(r.id, r.common_name) for r in rows], [(1, "c1b"), (2, "c2")])
            self.assertEqual([r.id for r in rows2], [1, 2])
            with self.assertRaises(InvalidRequestError):
                rows[0].name  # raiseload: touching a removed column never emits SQL naming it
        # The column the flip hid still holds its old value: only the model
        # stopped naming it.
        with engine.connect() as conn:
            self.assertEqual(conn.execute(text(f'SELECT name FROM "{env.app}".instances WHERE id = 1')).scalar(),
                             "n1")

    def test_whole_table_removed(self):
        env = Env(self)
        env.release(removed=[("instances", [])])
        a = Agent(env.config())
        a.start(timeout=20)
        self.addCleanup(a.stop, 1.0)
        env.flip("L", "migrate")
        env.flip("L", "contract", "--force")
        epoch = env.epoch()
        harness.wait_for(lambda: a.snapshot().epoch == epoch, what="the contract flip")
        Instance = model(env.app)
        with a.guard() as snap:
            self.assertEqual(snap.columns(env.app + ".instances"), ())
            with self.assertRaises(TableRemoved):
                query_options(snap, Instance)
            with self.assertRaises(TableRemoved):
                writable(snap, Instance, {"id": 1})


if __name__ == "__main__":
    unittest.main()
