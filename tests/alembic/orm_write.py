"""Writes through SQLAlchemy's ORM, as an application would, with the schema Alembic left:
python3 orm_write.py DB NODE [posts|authors] ..."""
import sys

from sqlalchemy import Boolean, ForeignKey, String, Text, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "authors"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))


class Post(Base):
    __tablename__ = "posts"
    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(ForeignKey("authors.id"))
    title: Mapped[str] = mapped_column(String(200))
    content: Mapped[str | None] = mapped_column(Text)
    published: Mapped[bool] = mapped_column(Boolean, default=False)
    slug: Mapped[str | None] = mapped_column(String(200), unique=True)


db, node = sys.argv[1], int(sys.argv[2])
engine = create_engine(f"sqlite:///{db}", connect_args={"timeout": 30})
with Session(engine) as s:
    author = Author(id=node * 100, name=f"author on node {node}")
    s.add(author)
    s.flush()
    s.add(
        Post(
            id=node * 100 + 1,
            author_id=author.id,
            title=f"written on node {node}",
            content="hello",
            published=True,
            slug=f"node-{node}",
        )
    )
    # And an update of a row another node wrote (the first post, if it arrived).
    first = s.scalars(select(Post).where(Post.id == 1)).first()
    if first is not None and node == 3:
        first.published = True
    s.commit()
